"""Generated inputs for the metric tests, shared by the golden maker
(tests/make_metric_goldens.py) and the live tests (tests/test_metrics.py): seeded, so the same
seed gives the same cases everywhere. Each generator aims at the rules that matter: the VQA
answers mix the spellings the official normalization folds together; the captions share
n-grams; the boxes overlap near the IoU thresholds, repeat, tie in score, and some images hold
no ground truth."""

import numpy as np

# spellings the VQA normalization folds together (or must not)
VQA_VARIANTS = [
    ["2", "two", "Two", "two.", "2.", "the two", " 2 "],
    ["yes", "Yes", "yes!", "YES", "yes."],
    ["no", "No", "none", "0", "zero", "nope"],
    ["dog", "a dog", "the dog", "dogs", "Dog.", "an dog"],
    ["don't know", "dont know", "do not know", "Don't Know"],
    ["red and white", "red & white", "red/white", "red-white", "red, white", "red white"],
    ["1,000", "1000", "1, 000", "one thousand", "1.000"],
    ["3.5", "3,5", "3 .5", "three and half"],
    ["t-shirt", "tshirt", "t shirt", "T-Shirt", "(t-shirt)"],
    ["ten", "10", "10.", "10 o'clock", "10 oclock"],
    ["it's", "its", "it is", "itll", "it'll"],
    ["", " ", "\n", "unanswerable"],
    ["left", "on the left", "left side", "left\tside"],
    ["a", "an", "the", "a the", "A."],
]


def vqa_cases(seed, n):
    """(prediction, ten answers) pairs: the answers drawn from one or two variant groups (so
    some sets are all identical and some differ in spelling alone), the prediction from the
    same groups or another."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        g = rng.integers(len(VQA_VARIANTS))
        group = VQA_VARIANTS[g]
        kind = rng.integers(4)
        if kind == 0:                                              # all ten identical
            answers = [group[rng.integers(len(group))]] * 10
        elif kind == 1:                                            # one group, several spellings
            answers = [group[i] for i in rng.integers(len(group), size=10)]
        else:                                                      # two groups, mixed counts
            other = VQA_VARIANTS[rng.integers(len(VQA_VARIANTS))]
            k = int(rng.integers(0, 11))
            answers = [group[i] for i in rng.integers(len(group), size=k)] + \
                      [other[i] for i in rng.integers(len(other), size=10 - k)]
            rng.shuffle(answers)
        source = group if rng.random() < 0.8 else VQA_VARIANTS[rng.integers(len(VQA_VARIANTS))]
        cases.append((source[rng.integers(len(source))], list(answers)))
    return cases


ALPHABET = "abcde fghij"


def text_pairs(seed, n):
    """(prediction, answers) for ANLS: short strings that differ by a few edits, in mixed case,
    with empty strings among them."""
    rng = np.random.default_rng(seed)

    def word():
        return "".join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=rng.integers(0, 9)))

    def edit(s):
        s = list(s)
        for _ in range(rng.integers(0, 4)):
            op = rng.integers(3)
            i = int(rng.integers(0, len(s) + 1))
            if op == 0:
                s.insert(i, ALPHABET[rng.integers(len(ALPHABET))])
            elif s and op == 1:
                del s[min(i, len(s) - 1)]
            elif s:
                s[min(i, len(s) - 1)] = ALPHABET[rng.integers(len(ALPHABET))]
        out = "".join(s)
        return out.upper() if rng.random() < 0.2 else out
    cases = []
    for _ in range(n):
        answers = [word() for _ in range(rng.integers(1, 4))]
        cases.append((edit(answers[0]), answers))
    return cases


NUMBERS = ["0", "0.0", "12", "12.5", "13", "12%", "0.12", "-3", "-3.1", "1e3", "1000", "nan", "inf", "abc", "ABC",
           "", "12.6", "11.4", "11.9", "100%", "1", " 12", "12 ", "1,000", "0.05", "0.0525"]


def relaxed_cases(seed, n):
    rng = np.random.default_rng(seed)
    return [(NUMBERS[rng.integers(len(NUMBERS))], NUMBERS[rng.integers(len(NUMBERS))]) for _ in range(n)]


WORDS = "a red blue green circle square triangle on the left right of and two small big".split()


def caption_corpus(seed, n_images, max_refs=5):
    """Tokenized captions (lower-case words, single spaces): predictions and reference lists that
    share words and n-grams, of varied lengths (an empty prediction among them)."""
    rng = np.random.default_rng(seed)

    def sentence(lo=1, hi=12):
        return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(lo, hi)))
    preds, refs = [], []
    for _ in range(n_images):
        r = [sentence() for _ in range(rng.integers(1, max_refs + 1))]
        base = r[0].split()
        if rng.random() < 0.6:                                     # a near copy of a reference
            keep = [w for w in base if rng.random() < 0.8]
            p = " ".join(keep + [WORDS[j] for j in rng.integers(len(WORDS), size=rng.integers(0, 3))])
        else:
            p = sentence(0, 10)
        preds.append(p)
        refs.append(r)
    return preds, refs


LABELS = ["circle", "square", "triangle"]


def detection_set(seed, n_images, size=100.0):
    """(predictions, ground_truth) over n_images: per image 0-4 ground-truth boxes, detections
    near them (jittered so IoUs fall around the thresholds), duplicates, stray boxes, labels
    seen only in the predictions, integer and tied scores; some images without ground truth."""
    rng = np.random.default_rng(seed)

    def box():
        y0, x0 = rng.uniform(0, size * 0.7, 2)
        h, w = rng.uniform(size * 0.05, size * 0.3, 2)
        return [float(y0), float(x0), float(y0 + h), float(x0 + w)]
    preds, gts = [], []
    for _ in range(n_images):
        g = [{"label": LABELS[rng.integers(3)], "box_yxyx": box()} for _ in range(rng.integers(0, 5))]
        p = []
        for o in g:
            for _ in range(rng.integers(0, 3)):                    # 0-2 detections per object
                b = np.asarray(o["box_yxyx"]) + rng.normal(0, size * 0.03, 4)
                label = o["label"] if rng.random() < 0.85 else LABELS[rng.integers(3)]
                y0, y1 = sorted((float(b[0]), float(b[2])))
                x0, x1 = sorted((float(b[1]), float(b[3])))
                p.append({"label": label, "box_yxyx": [y0, x0, y1, x1],       # 1-digit scores tie often
                          "score": float(np.round(rng.uniform(0, 1), 1 if rng.random() < 0.3 else 6))})
        for _ in range(rng.integers(0, 3)):                        # stray detections
            p.append({"label": (LABELS + ["star"])[rng.integers(4)], "box_yxyx": box(),
                      "score": float(rng.uniform(0, 1))})
        if p and rng.random() < 0.2:                               # an exact duplicate
            p.append(dict(p[0]))
        order = rng.permutation(len(p))
        preds.append([p[i] for i in order])
        gts.append(g)
    return preds, gts


def crowded_set(seed, n_images=2, per_image=150):
    """More than COCOeval's 100 detections per image and label: the truncation to the 100 best
    matters (the ground truth among them and beyond)."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        g = []
        for _ in range(6):
            y0, x0 = rng.uniform(0, 80, 2)
            g.append({"label": "circle", "box_yxyx": [float(y0), float(x0), float(y0 + 15), float(x0 + 15)]})
        p = []
        for _ in range(per_image):
            o = g[rng.integers(len(g))]["box_yxyx"]
            b = np.asarray(o) + rng.normal(0, 3, 4)
            y0, y1 = sorted((float(b[0]), float(b[2])))
            x0, x1 = sorted((float(b[1]), float(b[3])))
            p.append({"label": "circle", "box_yxyx": [y0, x0, y1 + 0.5, x1 + 0.5], "score": float(rng.uniform(0, 1))})
        preds.append(p)
        gts.append(g)
    return preds, gts
