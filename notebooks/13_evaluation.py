# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 13 · Is it better? The metrics PaliGemma is judged by
#
# **Goal.** Score answers the way PaliGemma's papers do, and see inside each score: VQA
# accuracy with its normalization, CIDEr-D's tf-idf n-grams, COCO's average precision; then
# score the demo model on held-out lines with `npvlm.evaluate`. The "by hand" cells rebuild each
# score from its formula (with npvlm's normalization and n-gram helpers) beside the library
# function; the check cells compare npvlm with what the reference implementations computed
# (the official VQA script, pycocoevalcap, pycocotools, big_vision's ANLS and relaxed-accuracy
# rules) on the committed cases in `tests/goldens/metrics.json` (`tests/make_metric_goldens.py`).
# Box and mask IoU are plain formulas with no reference file.
#
# $$
# \text{VQA acc} = \frac{1}{n}\sum_{i=1}^{n} \min\!\Big(1, \frac{\#\{j \ne i : a_j = p\}}{3}\Big),
# \qquad
# \text{CIDEr-D}(c, S) = \frac{10}{4}\sum_{k=1}^{4} \frac{1}{|S|}\sum_{s \in S}
#   e^{-\frac{(\ell_c - \ell_s)^2}{2\sigma^2}}\,
#   \frac{\sum_g \min(w_c(g), w_s(g))\, w_s(g)}{\lVert w_c^k\rVert\,\lVert w_s^k\rVert},
# $$
#
# with tf-idf weights $w(g) = \text{count}(g)\,(\log |I| - \log \max(1, \text{df}(g)))$ over the
# corpus's $|I|$ captions, and COCO's AP: the area under the monotone precision-recall curve,
# read at 101 recall points, averaged over IoU thresholds $.50:.05:.95$ (and labels).

# %%
MODEL = "demo"

import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import npvlm
from npvlm import metrics
from npvlm.demo.evaluate import EVAL_SEED, SCENE_SIZE
from npvlm.demo.scenes import make_scene, tasks
from npvlm.evaluation.run import evaluate
from npvlm.evaluation.score import scored_records
from npvlm.inputs.examples import read_jsonl
from npvlm.metrics.caption import _ngrams
from npvlm.metrics.vqa import process_digit_article, process_punctuation
from npvlm.parity import GOLDENS

plt.rcParams.update({"figure.dpi": 72})
golden = json.loads((GOLDENS / "metrics.json").read_text())
print({k: len(v) for k, v in golden.items() if isinstance(v, list)})

# %% [markdown]
# ## 1. VQA accuracy: ten annotators, and the rules that fold their spellings together
#
# VQA v2 asks ten people per question. An answer is right if at least three of the *other*
# annotators gave it, averaged over leaving each annotator out. Before comparing, the official
# script strips the ends and, **only when the ten answers are not all the same**, normalizes:
# punctuation, case, number words to digits, articles, contractions.

# %%
for text in ["Two.", "the dog", "red, white", "1,000", "dont know", "3.5"]:
    print(f"{text!r:14} -> punctuation {process_punctuation(text)!r:14} -> {process_digit_article(process_punctuation(text))!r}")

answers = ["2"] * 2 + ["two"] * 1 + ["3"] * 7
p = "two"
norm = [metrics.normalize_vqa_answer(a) for a in answers]
matches = np.array([a == metrics.normalize_vqa_answer(p) for a in norm])
leave_one_out = np.minimum(1, (matches.sum() - matches) / 3)       # for each i: the others that agree
print("\nmatches:", matches.astype(int), " per annotator left out:", leave_one_out.round(3))
print("by hand", leave_one_out.mean(), " metrics.vqa_accuracy", metrics.vqa_accuracy(p, answers))
print("ten identical answers are not normalized:", metrics.vqa_accuracy("Yes", ["yes"] * 10))

# %% [markdown]
# Check: every case the official `vqaEval.py` scored (800 generated answer sets that mix the
# spellings the rules fold together).

# %%
diff = max(abs(metrics.vqa_accuracy(c["prediction"], c["answers"]) - c["accuracy"]) for c in golden["vqa"])
print(f"{len(golden['vqa'])} cases, max |npvlm - official script| = {diff:.1e}")
assert diff < 1e-12
# the other short-answer metrics, against big_vision's rules (ANLS on the editdistance package)
anls_ok = sum(metrics.anls(c["prediction"], c["answers"]) == c["anls"] for c in golden["anls"])
relaxed_ok = sum(metrics.relaxed_accuracy(c["prediction"], c["answer"]) == c["relaxed"] for c in golden["relaxed"])
print(f"ANLS equal on {anls_ok} of {len(golden['anls'])}, relaxed accuracy on {relaxed_ok} of {len(golden['relaxed'])}")
assert anls_ok == len(golden["anls"]) and relaxed_ok == len(golden["relaxed"])

# %% [markdown]
# ## 2. CIDEr-D by hand
#
# CIDEr weighs each n-gram by how rare it is across the corpus's references (idf), compares the
# candidate's and each reference's tf-idf vectors by cosine, per n-gram length; the "-D" adds a
# clip (a candidate cannot gain by repeating an n-gram: $\min(w_c, w_s)$) and a Gaussian penalty
# on the length difference. pycocoevalcap's details are kept: its "length" counts bigrams.

# %%
preds = ["a red circle on the left", "a blue square", "two green triangles"]
refs = [["a red circle on the left", "a red circle"], ["a blue square on the right"], ["a green triangle", "two triangles"]]
n, sigma = 4, 6.0
ref_counts = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
df = {}
for counts in ref_counts:                          # in how many images' references does g occur?
    for g in set(g for c in counts for g in c):
        df[g] = df.get(g, 0) + 1
log_I = np.log(len(preds))


def tfidf(counts):
    vec = [{} for _ in range(n)]
    for g, tf in counts.items():
        vec[len(g) - 1][g] = tf * (log_I - np.log(max(1.0, df.get(g, 0))))
    return vec


def bigrams(counts):
    return sum(tf for g, tf in counts.items() if len(g) == 2)


i = 0                                              # the first caption, step by step
c_counts = _ngrams(preds[i].split(), n)
wc = tfidf(c_counts)
total = np.zeros(n)
for s_counts in ref_counts[i]:
    ws = tfidf(s_counts)
    penalty = np.exp(-(bigrams(c_counts) - bigrams(s_counts)) ** 2 / (2 * sigma ** 2))
    for k in range(n):
        dot = sum(min(w, ws[k].get(g, 0.0)) * ws[k].get(g, 0.0) for g, w in wc[k].items())
        norms = np.sqrt(sum(v * v for v in wc[k].values())) * np.sqrt(sum(v * v for v in ws[k].values()))
        total[k] += penalty * (dot / norms if norms else 0.0)
by_hand = 10 * total.mean() / len(ref_counts[i])
print("per n-gram length:", (total / len(ref_counts[i])).round(3))
print(f"caption 0 by hand {by_hand:.6f}, metrics.cider_per_example {metrics.cider_per_example(preds, refs)[0]:.6f}")
print("corpus CIDEr-D", metrics.cider(preds, refs), " BLEU-4", metrics.bleu(preds, refs))

# %% [markdown]
# Check: the corpora pycocoevalcap's `Bleu(4)` and `Cider()` scored, and its Java PTB tokenizer's
# output (npvlm's `tokenize` stands in for it; the captions where they differ are documented in
# docs/evaluation.md).

# %%
for g in golden["captions"]:
    d = max(abs(metrics.cider(g["predictions"], g["references"]) - g["cider"]),
            abs(metrics.bleu(g["predictions"], g["references"]) - g["bleu4"]),
            np.abs(metrics.cider_per_example(g["predictions"], g["references"]) - g["cider_per_example"]).max())
    print(f"{len(g['predictions']):3d} captions: CIDEr-D {g['cider']:.4f} BLEU-4 {g['bleu4']:.4f}  max |diff| {d:.1e}")
    assert d < 1e-6
same = sum(metrics.tokenize(c["caption"]) == c["tokens"] for c in golden["ptb"])
print(f"tokenize equals PTB on {same} of {len(golden['ptb'])} captions")

# %% [markdown]
# ## 3. COCO average precision by hand
#
# Detections are ranked by score; each takes the best unmatched ground-truth box of its label
# with IoU ≥ t (true positive) or none (false positive); precision and recall follow down the
# ranking; precision is made non-increasing from the right (the "envelope"), then read at 101
# recall points and averaged. PaliGemma gives no scores: `npvlm.evaluate` uses each object's
# tokens' mean log-probability (section 4).

# %%
g = golden["detection"][1]                          # 20 images, pycocotools' numbers beside it
label, t = "circle", 0.5
dets, n_gt = [], 0
for pred, truth in zip(g["predictions"], g["ground_truth"]):
    boxes = [o["box_yxyx"] for o in truth if o["label"] == label]
    n_gt += len(boxes)
    d = sorted([o for o in pred if o["label"] == label], key=lambda o: -o["score"])
    taken = set()
    for o in d:
        ious = [metrics.box_iou(o["box_yxyx"], b) if j not in taken else -1 for j, b in enumerate(boxes)]
        j = int(np.argmax(ious)) if ious else -1
        hit = j >= 0 and ious[j] >= t
        if hit:
            taken.add(j)
        dets.append((o["score"], hit))
order = np.argsort([-s for s, _ in dets], kind="mergesort")
tp = np.cumsum([dets[k][1] for k in order])
fp = np.cumsum([not dets[k][1] for k in order])
recall, precision = tp / n_gt, tp / (tp + fp)
envelope = np.maximum.accumulate(precision[::-1])[::-1]
points = np.linspace(0, 1, 101)
idx = np.searchsorted(recall, points, side="left")
ap = np.mean([envelope[k] if k < len(envelope) else 0.0 for k in idx])
only = metrics.detection_map([[o for o in p if o["label"] == label] for p in g["predictions"]],
                             [[o for o in t if o["label"] == label] for t in g["ground_truth"]])
print(f"{label}: {n_gt} objects, {len(dets)} detections, AP50 by hand {ap:.6f}, metrics.detection_map {only['ap50']:.6f}")
assert abs(ap - only["ap50"]) < 1e-12

plt.figure(figsize=(5, 3.2))
plt.plot(recall, precision, ".", ms=3, label="precision")
plt.step(recall, envelope, where="post", label="envelope")
plt.xlabel("recall")
plt.ylabel("precision")
plt.title(f"{label}, IoU ≥ {t}: AP {ap:.3f}")
plt.legend()
plt.show()

ours = metrics.detection_map(g["predictions"], g["ground_truth"])
print(f"metrics.detection_map per label (IoU .50:.95; npvlm's, pycocotools' summary has no per-label figure): "
      f"{ours['per_label']}")
print(f"map {ours['map']:.6f} ap50 {ours['ap50']:.6f} ap75 {ours['ap75']:.6f}")
print(f"pycocotools: map {g['map']:.6f} ap50 {g['ap50']:.6f} ap75 {g['ap75']:.6f}")
assert max(abs(ours[k] - g[k]) for k in ("map", "ap50", "ap75")) < 1e-6

# %% [markdown]
# ## 4. Scoring a model: `npvlm.evaluate` on held-out demo lines
#
# The command's work as a library call: each line's task from its prefix, greedy answers in
# batches, each task's metric. Detection answers come with each token's log-probability
# (`generate(logprobs=True)`), and each object is scored by its own tokens' mean.

# %%
model = npvlm.load(MODEL)
lines = []
folder = Path(tempfile.mkdtemp())
for i in range(20):
    scene = make_scene(np.random.default_rng([EVAL_SEED, i]), size=SCENE_SIZE)
    Image.fromarray(scene.image).save(folder / f"s{i}.png")
    lines += [{"image": f"s{i}.png", "prefix": p, "suffix": a} for p, a in tasks(scene)]
(folder / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
result = evaluate(model, read_jsonl(folder / "test.jsonl"), batch_size=16, quiet=True)
for task, ts in result.tasks.items():
    print(f"{task:8} {len(ts.scores):3d} lines  " + "  ".join(f"{k} {v:.4f}" for k, v in ts.metrics.items()))

row = next(r for r in result.rows if r["task"] == "detect" and len(r["objects"]) > 1)
gen = model.generate(row["image"], row["prefix"], logprobs=True)
print("\n" + row["prefix"], "->", gen.text)
for text, score in scored_records(gen, model.processor.tokenizer):
    print(f"  {text:45} mean log p {score:.3f}")

# %% [markdown]
# ## Exercises
#
# 1. In section 1, give the ten answers `["yes"] * 10` and predict `"Yes"`. Why is it 0? Change
#    one answer to `"no"` and predict again.
# 2. In section 2, repeat a word of caption 0 five times. Which of CIDEr-D's two guards (the
#    clip or the length penalty) keeps the score from rising? Set `sigma` very large to see.
# 3. In section 3, give every detection the same score. AP changes: why does the order of ties
#    matter, and what order does COCOeval use?
# 4. `python -m npvlm.evaluate --model demo --data FILE --predictions out.jsonl` on the file of
#    section 4: find a line where the demo is wrong, and explain it with `npvlm IMAGE PROMPT
#    --explain report.html` (notebook 12).
