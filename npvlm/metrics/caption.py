"""Caption metrics: BLEU and CIDEr-D, corpus-level, as the COCO caption evaluation computes them.

The reference is pycocoevalcap (github.com/salaniz/pycocoevalcap 1.2, the Python 3 port of
tylin/coco-caption that big_vision's coco_caption evaluator calls): `Bleu(4)` and `Cider()`.
On text that is already tokenized (lower-case words separated by single spaces) npvlm's
`bleu` and `cider` equal theirs to 1e-6 (tests/test_metrics.py). Both score a corpus: CIDEr's
n-gram weights come from the whole set of references, and BLEU sums its counts over the corpus
before taking the ratios, so neither is a mean of per-caption scores. `*_per_example` give the
per-caption scores pycocoevalcap reports beside them.

pycocoevalcap first runs Stanford's Java PTB tokenizer (`-lowerCase`) and drops punctuation
tokens. `tokenize` is npvlm's Java-free stand-in, written down in docs/evaluation.md with where
it differs; `bleu(..., tokenize=True)` and `cider(..., tokenize=True)` apply it first.
"""

import math
import re
from collections import Counter

import numpy as np

# the tokens pycocoevalcap's PTBTokenizer wrapper drops after tokenizing. The bracket names are
# upper-case there while the tokenizer runs with -lowerCase, so brackets survive as "-lrb-" ...
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
# PTB splits these off the word before them ("don't" -> "do n't", "cat's" -> "cat 's", "cannot"
# -> "can not", "gonna" -> "gon na", "gimme" -> "gim me", "y'all" -> "y' all")
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'d|'ll|'m)\b")
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b|\b(gim|lem)(me)\b|\b(y')(all)\b")
# periods PTB keeps on a word: initials ("a." too), dotted abbreviations ("u.s.", "p.m."), a few titles
_ABBREVIATIONS = (r"\b(?:[a-z]\.){2,}|\b[a-z]\.(?![\w.])"
                  r"|\b(?:mr|mrs|ms|dr|st|jr|sr|vs|mt|ft|inc|co|corp|ltd)\.(?=\s+\w)|\bno\.(?=\s+\d)")
# a token: an abbreviation, a number with inner , or : ("1,000", "5:30"), a word (with inner
# hyphens, periods, slashes or apostrophes: "well-known", "3.5-inch", "o'clock", "a/b"), a clitic,
# "...", "--", a run of ? and ! ("?!", kept: not in the list dropped), or any other single
# non-space character
_TOKEN = re.compile(_ABBREVIATIONS + r"|\by'(?=\s)|\d+(?:[,:]\d+)+(?:[-.'/]\w+)*|(?:n't|'s|'re|'ve|'d|'ll|'m)\b"
                                     r"|\w+(?:[-.'/]\w+)*|\.\.\.|--|[?!]{2,}|\S")


def tokenize(text):
    """A caption as the COCO evaluation compares it: lower-cased, PTB-style tokens (clitics
    split: "don't" -> "do n't"; hyphenated words, numbers like "1,000" and "5:30", and dotted
    abbreviations kept whole; brackets named "-lrb-" ...), the punctuation tokens
    pycocoevalcap drops dropped, joined by single spaces. A stand-in for Stanford's
    PTBTokenizer; docs/evaluation.md lists the differences."""
    text = text.replace("\n", " ").lower()
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = _CLITIC.sub(r"\1 \2", text)
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _ngrams(words, n):
    """Counts of every k-gram of `words`, k = 1..n."""
    counts = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not len(predictions):
        raise ValueError("no predictions to score")
    for refs in references:
        if isinstance(refs, str) or not len(refs):
            raise ValueError("each element of references must be a non-empty list of captions")


def _prepare(predictions, references, tokenize_first):
    _check(predictions, references)
    if tokenize_first:
        return [tokenize(p) for p in predictions], [[tokenize(r) for r in refs] for refs in references]
    return list(predictions), [list(refs) for refs in references]


# --- BLEU ---------------------------------------------------------------------------------------

TINY, SMALL = 1e-15, 1e-9        # bleu_scorer.py: a zero count gives ~0, a zero guess no division


def _bleu_counts(prediction, refs, n):
    """(candidate length, the closest reference length, matched k-grams, candidate k-grams):
    matches clipped by each k-gram's largest count in one reference; the closest length is the
    reference length nearest the candidate's, the shorter one on a tie."""
    words = prediction.split()
    clip = Counter()
    lengths = []
    for r in refs:
        rw = r.split()
        lengths.append(len(rw))
        for g, c in _ngrams(rw, n).items():
            clip[g] = max(clip[g], c)
    closest = min((abs(L - len(words)), L) for L in lengths)[1]
    correct = [0] * n
    for g, c in _ngrams(words, n).items():
        correct[len(g) - 1] += min(clip[g], c)
    guess = [max(0, len(words) - k + 1) for k in range(1, n + 1)]
    return len(words), closest, correct, guess


def _bleu_from(testlen, reflen, correct, guess, n):
    """BLEU-1..n: the geometric mean of the k-gram precisions, (correct + 1e-15) / (guess + 1e-9),
    times the brevity penalty exp(1 - r/c) when the candidate is shorter."""
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + TINY) / (guess[k] + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + TINY) / (reflen + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(predictions, references, n=4, tokenize=False):
    """Corpus BLEU-n (Papineni et al. 2002) as pycocoevalcap's Bleu(n) reports it (its n-th
    score): the k-gram matches and counts summed over the corpus, then

        BLEU-n = (prod_{k=1..n} (correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/n) * BP,
        BP = exp(1 - R/C) if C < R else 1,

    C the candidates' total length, R the sum over captions of the reference length closest to
    each candidate's (the shorter on a tie). `references[i]` lists the references of
    predictions[i]. Text is split on whitespace; `tokenize=True` applies `tokenize` first."""
    predictions, references = _prepare(predictions, references, tokenize)
    totals = [0, 0, [0] * n, [0] * n]
    for p, refs in zip(predictions, references):
        c = _bleu_counts(p, refs, n)
        totals[0] += c[0]
        totals[1] += c[1]
        totals[2] = [a + b for a, b in zip(totals[2], c[2])]
        totals[3] = [a + b for a, b in zip(totals[3], c[3])]
    return _bleu_from(*totals, n)[n - 1]


def bleu_per_example(predictions, references, n=4, tokenize=False):
    """Each caption's own BLEU-n (pycocoevalcap's per-image list): float64 [len(predictions)]."""
    predictions, references = _prepare(predictions, references, tokenize)
    return np.array([_bleu_from(*_bleu_counts(p, refs, n), n)[n - 1] for p, refs in zip(predictions, references)])


# --- CIDEr-D ------------------------------------------------------------------------------------

def cider_per_example(predictions, references, n=4, sigma=6.0, tokenize=False):
    """Each caption's CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider computes it:

        CIDEr-D(c, S) = 10 / n * sum_{k=1..n} 1/|S| sum_{s in S}
                        exp(-d^2 / (2 sigma^2)) * sum_g min(w_c(g), w_s(g)) w_s(g) / (|w_c^k| |w_s^k|)

    over the k-grams g of each length k, with tf-idf weights w_x(g) = count_x(g) * (log |I| -
    log max(1, df(g))), |I| the number of captions scored, df(g) how many of their reference
    sets hold g, |w^k| the norm of the k-gram weights (a zero norm leaves the sum as is, 0), and
    d the difference of the two texts' bigram counts (pycocoevalcap counts "length" there; for
    texts of at least one word that is the word-count difference). float64 [len(predictions)].
    With a single caption log |I| = 0 and every score is 0, as there."""
    predictions, references = _prepare(predictions, references, tokenize)
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    df = Counter()
    for counts in ref_counts:
        df.update(set(g for c in counts for g in c))
    log_images = np.log(float(len(predictions)))

    def vector(counts):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_images - np.log(max(1.0, df[g])))
            vec[k][g] = w
            norm[k] += w ** 2
            if k == 1:
                length += tf
        return vec, [np.sqrt(v) for v in norm], length

    scores = []
    for p, counts in zip(predictions, ref_counts):
        vh, nh, lh = vector(_ngrams(p.split(), n))
        total = np.zeros(n)
        for rc in counts:
            vr, nr, lr = vector(rc)
            val = np.zeros(n)
            for k in range(n):
                for g, w in vh[k].items():
                    wr = vr[k].get(g, 0.0)
                    val[k] += min(w, wr) * wr
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
                val[k] *= np.e ** (-(float(lh - lr) ** 2) / (2 * sigma ** 2))
            total += val
        scores.append(np.mean(total) / len(counts) * 10.0)
    return np.array(scores)


def cider(predictions, references, n=4, sigma=6.0, tokenize=False):
    """Corpus CIDEr-D: the mean of `cider_per_example` (pycocoevalcap's Cider score)."""
    return float(np.mean(cider_per_example(predictions, references, n, sigma, tokenize)))
