"""npvlm.metrics equal to the implementations the papers used: against committed goldens made by
those implementations (tests/make_metric_goldens.py), live against the packages when the
`reference` extra is installed (fresh seeds), and the rules and edge cases by hand."""

import json
import os
import shutil

import numpy as np
import pytest

import npvlm.metrics as M

import metric_cases as cases
from helpers import GOLDENS

GOLDEN = json.loads((GOLDENS / "metrics.json").read_text())
METRIC_FORMAT_VERSION = 1
# where npvlm's Java-free tokenizer differs from Stanford's PTBTokenizer (docs/evaluation.md)
# (":)" is one token ":-rrb-" for PTB unless it ends the whole input: it depends on the next line)
PTB_DIFFERENCES = {"rock 'n' roll", "Gov. Brown spoke at St. Mary's", "a cat :)"}


def test_goldens_format():
    assert GOLDEN["format_version"] == METRIC_FORMAT_VERSION, "python tests/make_metric_goldens.py --vqa-eval PATH"


# --- against the goldens -------------------------------------------------------------------------

def test_vqa_accuracy_equals_the_official_script():
    diffs = [abs(M.vqa_accuracy(c["prediction"], c["answers"]) - c["accuracy"]) for c in GOLDEN["vqa"]]
    print(f"{len(diffs)} questions, max |diff| {max(diffs):.1e}")
    assert max(diffs) < 1e-12
    assert len({c["accuracy"] for c in GOLDEN["vqa"]}) >= 5       # the cases reach many values


def test_anls_and_relaxed_accuracy_equal_big_visions_rules():
    assert all(M.anls(c["prediction"], c["answers"]) == c["anls"] for c in GOLDEN["anls"])
    assert all(M.relaxed_accuracy(c["prediction"], c["answer"]) == c["relaxed"] for c in GOLDEN["relaxed"])
    assert 0 < np.mean([c["anls"] for c in GOLDEN["anls"]]) < 1
    assert 0 < np.mean([c["relaxed"] for c in GOLDEN["relaxed"]]) < 1


def test_bleu_and_cider_equal_pycocoevalcap():
    for g in GOLDEN["captions"]:
        p, r = g["predictions"], g["references"]
        d = [abs(M.bleu(p, r) - g["bleu4"]), abs(M.cider(p, r) - g["cider"]),
             np.abs(M.bleu_per_example(p, r) - g["bleu4_per_example"]).max(),
             np.abs(M.cider_per_example(p, r) - g["cider_per_example"]).max()]
        print(f"{len(p)} captions: BLEU-4 {g['bleu4']:.4f} CIDEr {g['cider']:.4f}, max |diff| {max(d):.1e}")
        assert max(d) < 1e-6


def test_detection_map_equals_cocoeval():
    for g in GOLDEN["detection"]:
        ours = M.detection_map(g["predictions"], g["ground_truth"])
        d = max(abs(ours[k] - g[k]) for k in ("map", "ap50", "ap75"))
        print(f"{len(g['ground_truth'])} images: mAP {g['map']:.4f} AP50 {g['ap50']:.4f} AP75 {g['ap75']:.4f}, "
              f"max |diff| {d:.1e}")
        assert d < 1e-6
    assert {round(g["map"], 6) for g in GOLDEN["detection"]} >= {0.0, 1.0}     # none found; all found
    assert max(len(p) for g in GOLDEN["detection"] for p in g["predictions"]) > 100   # COCOeval's maxDets bites


def test_the_tokenizer_equals_ptb_but_where_documented():
    differ = {c["caption"] for c in GOLDEN["ptb"] if M.tokenize(c["caption"]) != c["tokens"]}
    assert differ == PTB_DIFFERENCES


# --- live, against the packages (fresh seeds) ----------------------------------------------------

def test_live_caption_metrics_and_map():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (pip install -e '.[reference]')")
    pytest.importorskip("pycocotools", reason="pycocotools not installed (pip install -e '.[reference]')")
    import metric_reference as ref
    for seed in range(100, 106):
        p, r = cases.caption_corpus(seed, 20 + 10 * (seed % 3))
        b, bs, c, cs = ref.coco_caption_scores(p, r)
        assert abs(M.bleu(p, r) - b) < 1e-6 and abs(M.cider(p, r) - c) < 1e-6
        assert np.abs(M.cider_per_example(p, r) - cs).max() < 1e-6
        for preds, gts in (cases.detection_set(seed, 15), cases.crowded_set(seed)):
            want, got = ref.coco_detection_map(preds, gts), M.detection_map(preds, gts)
            assert max(abs(got[k] - want[k]) for k in ("map", "ap50", "ap75")) < 1e-6


def test_live_anls_and_relaxed():
    pytest.importorskip("editdistance", reason="editdistance not installed (pip install -e '.[reference]')")
    import metric_reference as ref
    for p, a in cases.text_pairs(101, 500):
        assert M.anls(p, a) == ref.anls_reference(p, a)
    for p, a in cases.relaxed_cases(101, 500):
        assert M.relaxed_accuracy(p, a) == ref.relaxed_reference(p, a)


def test_live_vqa_accuracy():
    path = os.environ.get("NPVLM_VQA_EVAL")
    if not path:
        pytest.skip("set NPVLM_VQA_EVAL to the official vqaEval.py (github.com/GT-Vision-Lab/VQA) to run it live")
    import metric_reference as ref
    c = cases.vqa_cases(101, 1000)
    assert np.abs(np.array([M.vqa_accuracy(*x) for x in c]) - ref.official_vqa_accuracies(c, path)).max() < 1e-12


def test_live_tokenizer():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (pip install -e '.[reference]')")
    if not shutil.which("java"):
        pytest.skip("java not on PATH (pycocoevalcap's PTB tokenizer is Java)")
    import metric_reference as ref
    captions = [" ".join(w.capitalize() if i == 0 else w for i, w in enumerate(p.split())) + "."
                for p in cases.caption_corpus(7, 30)[0]] + ["A dog, a cat; (two) 3.5-inch \"toys\"!"]
    assert [M.tokenize(c) for c in captions] == ref.ptb_tokenize(captions)


# --- the rules, by hand ----------------------------------------------------------------------------

def test_vqa_rules():
    assert M.vqa_accuracy("two", ["2"] * 10) == 0.0                # all identical: nothing normalized
    assert M.vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0         # they differ: "two" -> "2"
    assert M.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)   # 8 x 2/3 + 2 x 1/3, / 10
    assert M.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # normalized, the three dogs match: each leaves 2 others (2/3), "cat" leaves 3 (1): 3/4
    assert M.vqa_accuracy("The Dog.", ["dog", "dog", "a dog", "cat"]) == pytest.approx(0.75)
    assert M.vqa_accuracy("dont", ["don't"] * 4 + ["no"]) == 1.0    # each "don't" leaves 3 others
    assert M.normalize_vqa_answer("red, white") == "red white"
    assert M.normalize_vqa_answer("1,000") == "1000"               # a digit,digit: punctuation deleted
    assert M.normalize_vqa_answer("3.5") == "3.5"                  # a period before a digit stays
    with pytest.raises(ValueError):
        M.vqa_accuracy("x", [])


def test_short_answer_edges():
    assert M.anls("", [""]) == 1.0 and M.anls("x", [""]) == 0.0
    assert M.anls("Hello", ["hello"]) == 1.0 and M.anls("Hello", ["hello"], lower=False) < 1
    assert M.anls("abcd", ["abce"]) == 0.75 and M.anls("ab", ["cd"]) == 0.0
    assert M.relaxed_accuracy("10.4", "10") == 1.0 and M.relaxed_accuracy("10.6", "10") == 0.0
    assert M.relaxed_accuracy("0", "0") == 1.0 and M.relaxed_accuracy("0.01", "0") == 0.0   # 0 needs the text
    assert M.relaxed_accuracy("12%", "0.12") == 1.0 and M.relaxed_accuracy("Paris", "paris") == 1.0
    assert M.exact_match(" cat ", ["dog", "cat"]) == 1.0 and M.exact_match("Cat", ["cat"]) == 0.0
    assert M.exact_match("Cat", ["cat"], lower=True) == 1.0


def test_caption_edges():
    assert M.cider(["a b c"], [["a b c"]]) == 0.0                   # one caption: every idf weight is 0
    refs = [["a red circle", "a circle"], ["a blue square"]]
    assert M.bleu(["", ""], refs) < 1e-9 and M.cider(["", ""], refs) == 0.0
    same = ["a red circle on the left", "a blue square on the right"]
    assert M.bleu(same, [[t] for t in same]) == pytest.approx(1.0)
    # a caption shorter than 4 words has no 4-gram: its BLEU-4 is ~0 (1e-15 / 1e-9 for that precision)
    assert M.bleu(["a red circle"], [["a red circle"]]) < 0.04
    assert M.bleu(["A red circle."], [["a red circle"]], tokenize=True) == pytest.approx(
        M.bleu(["a red circle"], [["a red circle"]]))
    for bad in ([["a"], []], [[], []]):
        with pytest.raises(ValueError):
            M.bleu(["a", "b"][:len(bad)] if bad[0] else [], bad)
    with pytest.raises(ValueError):
        M.cider(["a"], ["a b"])                                     # a string, not a list of references


def test_box_edges():
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [0, 5, 10, 15]) == pytest.approx(1 / 3)
    assert M.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0 and M.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert M.box_iou([[0, 0, 10, 10]] * 2, [[0, 0, 10, 10]] * 3).shape == (2, 3)
    gt = [[{"label": "a", "box_yxyx": [0, 0, 10, 10]}]]
    assert M.detection_map([[]], [[]])["map"] == -1.0               # no ground truth: undefined, as COCOeval
    assert M.detection_map([[]], gt)["map"] == 0.0
    dup = [{"label": "a", "box_yxyx": [0, 0, 10, 10], "score": 0.9}] * 2
    assert M.detection_map([dup], gt)["map"] == pytest.approx(1.0)  # the duplicate is a false positive after it
    worse = [{"label": "a", "box_yxyx": [0, 0, 10, 10], "score": 0.5},
             {"label": "a", "box_yxyx": [50, 50, 60, 60], "score": 0.9}]
    assert M.detection_map([worse], gt)["ap50"] == pytest.approx(0.5, abs=0.01)
    assert M.refexp_accuracy([0, 0, 10, 10], [0, 0, 10, 8]) == 1.0 and M.refexp_accuracy(None, [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError):
        M.detection_map([[]], [[], []])


def test_mask_edges():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:, :2] = True
    assert M.mask_iou(a, b) == pytest.approx(4 / 12) and M.mask_iou(a, a) == 1.0
    assert M.mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0 and M.mask_iou(None, a) == 0.0
    assert M.miou([a, None], [a, a]) == 0.5
    with pytest.raises(ValueError):
        M.mask_iou(a, np.zeros((3, 3)))
