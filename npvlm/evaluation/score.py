"""Which metric an example is scored by, its ground truth, and the scores of a task.

Each example is a line of the fine-tuning JSONL (npvlm/inputs/examples.py) whose ground truth is
the `suffix`, or, where a task has several right answers or more than text, these keys:

    answers     list of strings  VQA-style tasks: every annotator's answer (VQA v2 has ten)
    references  list of strings  captions: every reference caption
    box_yxyx    [y0, x0, y1, x1] referring expressions: the target box in pixels
    mask        a PNG file       segmentation: the target mask (nonzero = object), the image's size

The task of an example (`task_of`): `--task` if given, else the line's `task` key if it has one,
else from the prefix's first word:

    caption -> caption   detect -> detect (refexp when the line has box_yxyx)   segment -> segment
    ocr -> anls          answer, question -> vqa                                 otherwise -> exact

and what each reports (npvlm/metrics has the formulas):

    vqa      accuracy: VQA accuracy against `answers` when a line has 4 or more, else exact match
    anls     anls: the best ANLS over `answers` (or the suffix), lower-cased
    relaxed  relaxed_accuracy: ChartQA's 5% tolerance against the suffix (or any of `answers`)
    exact    accuracy: equal, lower-cased, to the suffix or one of `answers`
    caption  cider, bleu4: corpus CIDEr-D and BLEU-4 against `references` (or the suffix),
             both texts through metrics.tokenize
    detect   map, ap50, ap75: COCO box mAP; the suffix's boxes are the ground truth, each
             predicted object's score is the mean log-probability of its tokens
    refexp   accuracy: the first predicted box has IoU >= 0.5 with `box_yxyx` (or the suffix's
             first box)
    segment  miou, box_accuracy: the first predicted object's mask IoU with `mask` (or the
             suffix's first mask decoded by the VAE) averaged over lines; its box at IoU >= 0.5
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..metrics import (
    anls,
    bleu,
    cider_per_example,
    detection_map,
    exact_match,
    mask_iou,
    objects_found,
    refexp_accuracy,
    relaxed_accuracy,
    vqa_accuracy,
)
from ..tasks.detection import DetectedObject, parse_detections, parse_record
from ..tasks.segmentation import object_masks

TASKS = ("vqa", "anls", "relaxed", "exact", "caption", "detect", "refexp", "segment")
BY_PREFIX = {"caption": "caption", "detect": "detect", "segment": "segment", "ocr": "anls", "answer": "vqa",
             "question": "vqa"}
VQA_MIN_ANSWERS = 4          # fewer answers: exact match (VQA accuracy needs 3 others to agree)
METRICS = {"vqa": ("accuracy",), "anls": ("anls",), "relaxed": ("relaxed_accuracy",), "exact": ("accuracy",),
           "caption": ("cider", "bleu4"), "detect": ("map", "ap50", "ap75"), "refexp": ("accuracy",),
           "segment": ("miou", "box_accuracy")}
# the metric finetune --val --keep-best uses, per task
MAIN_METRIC = {task: names[0] for task, names in METRICS.items()}


def task_of(example, task="auto"):
    """The task an example is scored as: `task`, else the line's own "task" key, else from its
    prefix (see the module docstring)."""
    if task != "auto":
        return task
    own = example.fields.get("task")
    if own is not None:
        if own not in TASKS:
            raise InputError(f"{_where(example)}: 'task' must be one of {', '.join(TASKS)}, got {own!r}")
        return own
    first = example.prefix.strip().split(" ", 1)[0].lower()
    found = BY_PREFIX.get(first, "exact")
    return "refexp" if found == "detect" and "box_yxyx" in example.fields else found


def _where(e):
    return f"{e.source} line {e.line}"


def _strings(e, key):
    """The line's list of strings under `key`, checked; None if the line has none."""
    v = e.fields.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        raise InputError(f"{_where(e)}: '{key}' must be a non-empty list of strings")
    return v


def _target_objects(e, divisor):
    found = parse_detections(e.suffix, *e.size, divisor)
    if found.problems:
        p = found.problems[0]
        raise InputError(f"{_where(e)}: the suffix's record {p.text!r} is not a box: {p.reason}")
    return found.objects


def ground_truth(e, task, divisor=1024, vae=None):
    """What an example's answer is scored against, checked: a list of strings (text tasks), a
    list of {"label", "box_yxyx"} (detect), a box (refexp), or (box, mask) (segment)."""
    if task in ("vqa", "anls", "relaxed", "exact"):
        return _strings(e, "answers") or [e.suffix]
    if task == "caption":
        return _strings(e, "references") or [e.suffix]
    if task == "detect":
        return [{"label": o.label, "box_yxyx": list(o.box)} for o in _target_objects(e, divisor)]
    if task == "refexp":
        if "box_yxyx" in e.fields:
            return _box(e)
        found = parse_detections(e.suffix, *e.size, divisor)
        if not found.objects:
            why = f" ({found.problems[0].text!r}: {found.problems[0].reason})" if found.problems else ""
            raise InputError(f"{_where(e)}: a referring expression needs 'box_yxyx' or a box in the suffix{why}")
        return list(found.objects[0].box)
    if task == "segment":
        if vae is None:
            raise InputError("the segment task needs the VQ-VAE mask decoder: pass --vae vae-oid.npz "
                             "(gs://big_vision/paligemma/vae-oid.npz)")
        return _target_mask(e, divisor, vae)
    raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _box(e):
    b = e.fields["box_yxyx"]
    numbers = isinstance(b, list) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
    if not numbers or not (b[2] > b[0] and b[3] > b[1]):
        raise InputError(f"{_where(e)}: 'box_yxyx' must be [y0, x0, y1, x1], finite numbers in pixels, with y1 > y0 "
                         "and x1 > x0")
    return [float(v) for v in b]


def _target_mask(e, divisor, vae):
    """(box or None, bool mask [H, W]) of a segmentation line."""
    width, height = e.size
    if "mask" in e.fields:
        if not isinstance(e.fields["mask"], str):
            raise InputError(f"{_where(e)}: 'mask' must be the path of a PNG file")
        path = (Path(e.source).parent / e.fields["mask"]).resolve()
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L")) > 0
        except Exception as err:  # noqa: BLE001 (Pillow raises several types; reported as one line)
            raise InputError(f"{_where(e)}: mask {e.fields['mask']!r} cannot be read ({type(err).__name__})") from None
        if mask.shape != (height, width):
            raise InputError(f"{_where(e)}: mask is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
        box = _box(e) if "box_yxyx" in e.fields else None
        return box, mask
    objects = [o for o in _target_objects(e, divisor) if o.seg is not None]
    if not objects:
        raise InputError(f"{_where(e)}: a segmentation line needs 'mask' or <seg> codes in the suffix")
    return list(objects[0].box), object_masks(objects[:1], vae, width, height)[0]


def scored_records(generation, tokenizer):
    """The answer's records (text split at ';') with their scores: the mean log-probability of
    each record's own tokens, its <loc> tokens and its label's (the ' ;' separator, tokens that
    are only spaces, and <eos> aside). -> [(record text, score)]"""
    ids = list(generation.tokens)
    lps = list(generation.logprobs)
    if ids and ids[-1] == tokenizer.eos_id:
        ids, lps = ids[:-1], lps[:-1]
    sums, counts = {}, {}
    before_text, before = "", 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        after = text.count(";")
        own = text[len(before_text):] if text.startswith(before_text) else tokenizer.decode([ids[i]])
        if after == before and own.strip():         # a token of record `before`: not a separator or a space
            sums[before] = sums.get(before, 0.0) + lps[i]
            counts[before] = counts.get(before, 0) + 1
        before_text, before = text, after
    records = generation.text.split(";")
    return [(r.strip(), sums[k] / counts[k] if counts.get(k) else float("-inf")) for k, r in enumerate(records)]


def predicted_objects(generation, tokenizer, size, divisor):
    """[{"label", "box_yxyx", "score"}] of a detection answer (malformed records left out)."""
    out = []
    for text, s in scored_records(generation, tokenizer):
        if text:
            o = parse_record(text, *size, divisor)
            if isinstance(o, DetectedObject):
                out.append({"label": o.label, "box_yxyx": list(o.box), "score": float(s)})
    return out


@dataclass
class TaskScore:
    task: str
    metrics: dict                   # metric name -> value over the task's examples
    scores: list                    # per example: its own score (see `score_task`)
    truths: list = field(default_factory=list)      # per example: the ground truth, JSON-ready
    outputs: list = field(default_factory=list)     # per example: what was scored, JSON-ready
    note: str = ""                  # how the metric was taken, where it needs saying


def _recall50(pred, truth):
    """The share of ground-truth objects found (metrics.objects_found, IoU >= 0.5); no objects
    to find: 1 if the answer names none, else 0."""
    return objects_found(pred, truth) / len(truth) if truth else float(not pred)


def score_task(task, examples, generations, truths, tokenizer, divisor=1024, vae=None):
    """One task's metrics over its examples (`truths`: their `ground_truth`) and each example's
    own score: its accuracy / ANLS / relaxed accuracy; CIDEr-D (caption); the share of
    ground-truth objects found at IoU >= 0.5 (detect); 0 or 1 (refexp); mask IoU (segment)."""
    texts = [g.text for g in generations]
    if task in ("vqa", "anls", "relaxed", "exact"):
        if task == "vqa":
            scores = [vqa_accuracy(t, a) if len(a) >= VQA_MIN_ANSWERS else exact_match(t, a, lower=True)
                      for t, a in zip(texts, truths)]
        elif task == "anls":
            scores = [anls(t, a) for t, a in zip(texts, truths)]
        elif task == "relaxed":
            scores = [max(relaxed_accuracy(t, x) for x in a) for t, a in zip(texts, truths)]
        else:
            scores = [exact_match(t, a, lower=True) for t, a in zip(texts, truths)]
        few = sum(len(a) < VQA_MIN_ANSWERS for a in truths) if task == "vqa" else 0
        note = (f"{few} of {len(truths)} lines have fewer than {VQA_MIN_ANSWERS} answers: scored by exact match "
                "(lower-cased)" if few else "")
        return TaskScore(task, {METRICS[task][0]: float(np.mean(scores))}, scores, truths, texts, note)
    if task == "caption":
        scores = cider_per_example(texts, truths, tokenize=True).tolist()
        note = ("one caption: CIDEr's n-gram weights come from the whole set (log of its size, 0 here), so it "
                "is 0; score several" if len(texts) == 1 else "")
        return TaskScore(task, {"cider": float(np.mean(scores)), "bleu4": bleu(texts, truths, tokenize=True)},
                         scores, truths, texts, note)
    if task == "detect":
        preds = [predicted_objects(g, tokenizer, e.size, divisor) for g, e in zip(generations, examples)]
        m = detection_map(preds, truths)
        return TaskScore(task, {k: m[k] for k in ("map", "ap50", "ap75")},
                         [_recall50(p, t) for p, t in zip(preds, truths)], truths, preds)
    if task == "refexp":
        boxes = []
        for g, e in zip(generations, examples):
            objects = parse_detections(g.text, *e.size, divisor).objects
            boxes.append(list(objects[0].box) if objects else None)
        scores = [refexp_accuracy(b, t) for b, t in zip(boxes, truths)]
        return TaskScore(task, {"accuracy": float(np.mean(scores))}, scores, truths, boxes)
    if task == "segment":
        scores, box_hits, boxes = [], [], []
        for g, e, (tbox, tmask) in zip(generations, examples, truths):
            objects = [o for o in parse_detections(g.text, *e.size, divisor).objects if o.seg is not None]
            mask = object_masks(objects[:1], vae, *e.size)[0] if objects else None
            scores.append(mask_iou(mask, tmask))
            boxes.append(list(objects[0].box) if objects else None)
            if tbox is not None:
                box_hits.append(refexp_accuracy(boxes[-1], tbox))
        metrics = {"miou": float(np.mean(scores))}
        if box_hits:
            metrics["box_accuracy"] = float(np.mean(box_hits))
        return TaskScore(task, metrics, scores, [t[0] for t in truths], boxes)
    raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
