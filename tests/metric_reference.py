"""The reference implementations the metric tests compare npvlm.metrics with, called as their
users call them (dev-only: pycocotools, pycocoevalcap, editdistance from the `reference` extra;
the official VQA script and Java where present):

- VQA accuracy: the official evaluation script itself, vqaEval.py of GT-Vision-Lab/VQA (commit
  a013f00), read from a path you give (it is not on PyPI; `git clone
  https://github.com/GT-Vision-Lab/VQA` and pass PythonEvaluationTools/vqaEvaluation/vqaEval.py).
  It is Python 2: its print statements are rewritten by lib2to3's print fixer, nothing else.
- BLEU, CIDEr-D: pycocoevalcap's Bleu(4) and Cider(); its PTBTokenizer (needs `java`).
- COCO mAP: pycocotools' COCOeval (bbox).
- ANLS: big_vision's anls_metric formula on `editdistance.eval` (the edit distance it uses);
  relaxed accuracy: big_vision's chartqa `_relaxed_match` rule. Neither is packaged, so the rule
  is transcribed here (a few lines each) from big_vision/evaluators/proj/paligemma/transfers/
  vqa.py and chartqa.py, with the text lower-cased first as PaliGemma's configs ask
  (`to_lower=True`).
"""

import contextlib
import io
import warnings


def official_vqa_accuracies(cases, vqa_eval_path):
    """Per-case accuracies from the official VQAEval.evaluate (cases: (prediction, answers))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lib2to3.refactor import RefactoringTool
        source = open(vqa_eval_path, encoding="utf-8").read()
        source = str(RefactoringTool(["lib2to3.fixes.fix_print"]).refactor_string(source + "\n", "vqaEval"))
    namespace = {"__name__": "vqaEval"}
    exec(compile(source, vqa_eval_path, "exec"), namespace)

    class Annotations:                   # the two objects VQAEval reads: .qa and getQuesIds()
        def __init__(self, qa):
            self.qa = qa

        def getQuesIds(self):
            return list(self.qa)
    gts = Annotations({q: {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
                           "question_type": "t", "answer_type": "a"} for q, (_, answers) in enumerate(cases)})
    res = Annotations({q: {"answer": p} for q, (p, _) in enumerate(cases)})
    ev = namespace["VQAEval"](gts, res, n=12)          # n: digits kept when it rounds 100 * acc
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    return [ev.evalQA[q] / 100 for q in range(len(cases))]


def coco_caption_scores(predictions, references):
    """(BLEU-4, per-image BLEU-4, CIDEr-D, per-image CIDEr-D) from pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    gts = {i: list(r) for i, r in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):
        b, bs = Bleu(4).compute_score(gts, res, verbose=0)
        c, cs = Cider().compute_score(gts, res)
    return float(b[3]), [float(v) for v in bs[3]], float(c), [float(v) for v in cs]


def ptb_tokenize(captions):
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java) on each caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


def coco_detection_map(predictions, ground_truth):
    """{"map", "ap50", "ap75"} from pycocotools' COCOeval (bbox, area all, maxDets 100)."""
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    labels = sorted({o["label"] for image in ground_truth + predictions for o in image} | {"_unused"})
    cat = {name: i + 1 for i, name in enumerate(labels)}

    def xywh(b):
        y0, x0, y1, x1 = b
        return [x0, y0, x1 - x0, y1 - y0]
    anns = []
    for img, objects in enumerate(ground_truth):
        for o in objects:
            b = xywh(o["box_yxyx"])
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat[o["label"]], "bbox": b,
                         "area": b[2] * b[3], "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(ground_truth))], "annotations": anns,
                  "categories": [{"id": v, "name": k} for k, v in cat.items()]}
    dets = [{"image_id": img, "category_id": cat[o["label"]], "bbox": xywh(o["box_yxyx"]), "score": o["score"]}
            for img, objects in enumerate(predictions) for o in objects]
    # loadRes cannot take an empty list: one detection of a label without ground truth changes
    # nothing (COCOeval skips labels without ground truth)
    dets = dets or [{"image_id": 0, "category_id": cat["_unused"], "bbox": [0, 0, 1, 1], "score": 1.0}]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    p = ev.eval["precision"][:, :, :, 0, -1]           # [T, R, K] at area "all", maxDets 100

    def mean(a):
        return float(np.mean(a[a > -1])) if (a > -1).any() else -1.0
    return {"map": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2]),
            "check": mean(p)}


def anls_reference(prediction, answers, theta=0.5):
    import editdistance
    p = prediction.lower()
    best = 0.0
    for target in answers:
        t = target.lower()
        if t:
            nl = editdistance.eval(t, p) / max(len(t), len(p))
            best = max(best, 1 - nl if nl < theta else 0)
        else:
            best = max(best, float(p == ""))
    return best


def relaxed_reference(prediction, target, max_relative_error=0.05):
    def to_float(text):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None
    prediction, target = prediction.lower(), target.lower()
    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_error)
    return float(prediction == target)
