"""Short-answer metrics: VQA accuracy, ANLS, relaxed accuracy, exact match.

Each takes the model's answer as text and the reference answer(s) as text and returns a score
in [0, 1] for one question; a task's score is the mean over its questions (`mean`).

- `vqa_accuracy`: the VQA v2 challenge's accuracy, as the official evaluation script computes it
  (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, commit a013f00 of
  2021-03-11, "Fixed processing answers bug"; big_vision's vqav2 evaluator follows the same
  rules). PaliGemma reports it for VQAv2, OK-VQA, A-OKVQA, TextVQA, VizWiz-VQA.
- `anls`: Average Normalized Levenshtein Similarity (Biten et al. 2019, eq. 1), as big_vision's
  vqa evaluator computes it for DocVQA, InfographicVQA and ST-VQA (lower-cased answers).
- `relaxed_accuracy`: ChartQA's relaxed correctness (Masry et al. 2022, after Methani et al.
  2020), as big_vision's chartqa evaluator and pix2struct's metrics compute it.
- `exact_match`: the answer equals one of the references (OCR-VQA, GQA, AI2D, ...).
"""

import re

# --- the VQA answer normalization (vqaEval.py, VQAEval.__init__) --------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# a period not followed by a digit ("(?!<=\d)" in the script is a look-ahead that always holds:
# a typo for a look-behind, kept for equality)
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)     # ASCII digits, as Python 2's re there
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)", re.ASCII)


def process_punctuation(text):
    """vqaEval.processPunctuation: each punctuation mark is deleted where the text has it next to
    a space (or has a digit,digit anywhere), else replaced by a space; then at most 32 periods not
    followed by a digit are deleted (the script passes re.UNICODE, 32, as `count`)."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out, count=32)


def process_digit_article(text):
    """vqaEval.processDigitArticle: lower-case, split on whitespace, number words 0-10 to digits,
    articles dropped, contractions restored ("dont" -> "don't"), joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text):
    """The whole normalization the script applies to an answer (when it applies one)."""
    return process_digit_article(process_punctuation(text))


def _strip(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction, answers):
    """VQA accuracy of one answer against the human answers (ten in VQA v2):

        acc = mean over i of min(1, #{j != i : answers[j] == prediction} / 3)

    the leave-one-out average of "right if at least 3 of the other annotators said it". As in
    vqaEval.py: newlines and tabs become spaces and ends are stripped; then, only if the answers
    are not all identical, the answers and the prediction are normalized (`normalize_vqa_answer`:
    punctuation, case, number words, articles, contractions). When all answers are identical
    nothing is normalized: "Yes" does not match ten "yes". An empty `answers` is an error."""
    if isinstance(answers, str) or not len(answers):
        raise ValueError("answers must be a non-empty list of strings")
    gts = [_strip(a) for a in answers]
    pred = _strip(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_vqa_answer(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


# --- ANLS -------------------------------------------------------------------------------------

def levenshtein(a, b):
    """The edit distance between two strings (insertions, deletions, substitutions, each 1),
    by the classic dynamic programme one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction, answers, threshold=0.5, lower=True):
    """ANLS of one answer: the best over the reference answers a of

        s(a) = 1 - NL(a, p)  if NL(a, p) < threshold,  else 0,   NL = levenshtein / max(|a|, |p|)

    (Biten et al. 2019, eq. 1; threshold 0.5 for DocVQA). An empty reference scores 1 for an
    empty prediction and 0 otherwise. `lower`: compare lower-cased, as PaliGemma's configs do
    (big_vision's `to_lower=True`); spaces count, as in big_vision (the DocVQA site's evaluator
    also strips leading and trailing spaces)."""
    if isinstance(answers, str):
        answers = [answers]
    if not len(answers):
        raise ValueError("answers must be a non-empty list of strings")
    p = prediction.lower() if lower else prediction
    best = 0.0
    for a in answers:
        a = a.lower() if lower else a
        if not a:
            s = float(p == "")
        else:
            nl = levenshtein(a, p) / max(len(a), len(p))
            s = 1 - nl if nl < threshold else 0.0
        best = max(best, s)
    return best


# --- relaxed accuracy, exact match -------------------------------------------------------------

def _to_float(text):
    """A number as ChartQA's evaluators read it: Python's float(), "12%" as 0.12; else None."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answer, tolerance=0.05, lower=True):
    """ChartQA's relaxed correctness: 1 if both are numbers and |p - a| / |a| <= tolerance, else
    1 if the texts are equal, else 0. A reference of 0 (or one that is not a number) needs the
    exact text. Numbers are read by Python's float() ("12%" as 0.12). `lower`: compare the text
    lower-cased, as PaliGemma's ChartQA config (`to_lower=True`) and pix2struct do."""
    if lower:
        prediction, answer = prediction.lower(), answer.lower()
    p, a = _to_float(prediction), _to_float(answer)
    if p is not None and a:
        return float(abs(p - a) / abs(a) <= tolerance)
    return float(prediction == answer)


def exact_match(prediction, answers, lower=False):
    """1 if the prediction equals one of the answers (after stripping the ends; lower-cased if
    `lower`), else 0."""
    if isinstance(answers, str):
        answers = [answers]

    def norm(s):
        return s.strip().lower() if lower else s.strip()
    return float(norm(prediction) in {norm(a) for a in answers})
