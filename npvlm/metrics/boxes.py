"""Box metrics: IoU, COCO detection mAP, referring-expression accuracy.

Boxes are [y0, x0, y1, x1] in pixels, PaliGemma's order (`box_yxyx` in `npvlm --json`).
`detection_map` is COCO's bounding-box evaluation as pycocotools' COCOeval computes it
(iouType "bbox", area range "all", at most 100 detections per image and label), rewritten in
NumPy step by step; tests/test_metrics.py holds it equal to pycocotools to 1e-6.
"""

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)      # COCOeval's iouThrs, .50:.05:.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)       # COCOeval's recThrs, 101-point interpolation
MAX_DETECTIONS = 100


def box_iou(a, b):
    """Intersection over union of boxes [y0, x0, y1, x1]: |a ∩ b| / (|a| + |b| - |a ∩ b|), areas
    (y1 - y0) * (x1 - x0) with no +1 (COCO's convention; a box of zero area has IoU 0). Two
    boxes -> a float; [n, 4] and [m, 4] -> float64 [n, m]."""
    single = np.ndim(a) == 1 and np.ndim(b) == 1
    A, B = (np.asarray(x, np.float64).reshape(-1, 4) for x in (a, b))
    top = np.maximum(A[:, None, 0], B[None, :, 0])
    left = np.maximum(A[:, None, 1], B[None, :, 1])
    bottom = np.minimum(A[:, None, 2], B[None, :, 2])
    right = np.minimum(A[:, None, 3], B[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = (A[:, 2] - A[:, 0]) * (A[:, 3] - A[:, 1])
    area_b = (B[:, 2] - B[:, 0]) * (B[:, 3] - B[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return float(iou[0, 0]) if single else iou


def _match(ious, threshold):
    """COCOeval.evaluateImg's greedy matching at one IoU threshold, for one image and label
    (ious: [detections, ground truth], detections highest score first): each detection takes the
    unmatched ground truth it overlaps most (IoU >= threshold; on equal IoU the later one).
    -> bool [detections]: matched."""
    n_det, n_gt = ious.shape
    taken = np.zeros(n_gt, bool)
    matched = np.zeros(n_det, bool)
    for d in range(n_det):
        best, m = min(threshold, 1 - 1e-10), -1
        for g in range(n_gt):
            if taken[g] or ious[d, g] < best:
                continue
            best, m = ious[d, g], g
        if m >= 0:
            taken[m] = matched[d] = True
    return matched


def _average_precision(scores, matched, n_gt):
    """COCOeval.accumulate for one label and IoU threshold: detections of every image sorted by
    score (stable), precision made non-increasing from the right, read at the 101 recall points
    (0 where a recall is never reached); AP is their mean."""
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(matched[order]).astype(float)
    fp = np.cumsum(~matched[order]).astype(float)
    recall = tp / n_gt
    precision = tp / (fp + tp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]      # the best precision at this recall or beyond
    found = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    reached = found < len(envelope)
    q[reached] = envelope[found[reached]]
    return float(np.mean(q))


def detection_map(predictions, ground_truth):
    """COCO box mAP of detections over a set of images:

        map  = mean over labels with ground truth, over IoU thresholds t in .50:.05:.95, of AP_t
        ap50 = the same at t = .50 alone, ap75 at t = .75

    AP_t: detections of every image sorted by score, each matched greedily to an unmatched
    ground-truth box of its label with IoU >= t, and the 101-point interpolated area under
    precision-recall (COCOeval, bbox, area "all", maxDets 100 per image and label).

    predictions: a list per image of {"label", "box_yxyx", "score"}; ground_truth: a list per
    image (same images, same order) of {"label", "box_yxyx"}. Labels are compared as given.
    Returns {"map", "ap50", "ap75", "labels": number of labels with ground truth,
    "per_label": {label: AP .50:.95}}; like COCOeval, -1.0 where there is no ground truth at all
    (a label found only in predictions does not count against the score)."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} images of predictions but {len(ground_truth)} of ground truth")
    labels = sorted({o["label"] for image in ground_truth for o in image})
    ap = np.full((len(IOU_THRESHOLDS), len(labels)), -1.0)
    for li, label in enumerate(labels):
        n_gt, scores, matched = 0, [], [[] for _ in IOU_THRESHOLDS]
        for dets, gts in zip(predictions, ground_truth):
            d = [o for o in dets if o["label"] == label]
            g = [o["box_yxyx"] for o in gts if o["label"] == label]
            n_gt += len(g)
            order = np.argsort([-float(o["score"]) for o in d], kind="mergesort")[:MAX_DETECTIONS]
            d = [d[i] for i in order]
            scores += [float(o["score"]) for o in d]
            ious = box_iou([o["box_yxyx"] for o in d], g) if d and g else np.zeros((len(d), len(g)))
            for ti, t in enumerate(IOU_THRESHOLDS):
                matched[ti].append(_match(ious, t))
        for ti in range(len(IOU_THRESHOLDS)):
            m = np.concatenate(matched[ti]) if matched[ti] else np.zeros(0, bool)
            ap[ti, li] = _average_precision(np.asarray(scores, np.float64), m, n_gt)

    def mean(a):
        return float(np.mean(a[a > -1])) if (a > -1).any() else -1.0
    return {"map": mean(ap), "ap50": mean(ap[0]), "ap75": mean(ap[5]), "labels": len(labels),
            "per_label": {label: mean(ap[:, i]) for i, label in enumerate(labels)}}


def objects_found(predictions, ground_truth, threshold=0.5):
    """How many ground-truth objects a detection answer finds: in order, each takes the unused
    predicted box of its label it overlaps most, found if IoU >= threshold (one-to-one; no
    scores needed). predictions, ground_truth: lists of {"label", "box_yxyx"}."""
    used, found = set(), 0
    for t in ground_truth:
        best, best_j = 0.0, None
        for j, p in enumerate(predictions):
            if j not in used and p["label"] == t["label"]:
                v = box_iou(p["box_yxyx"], t["box_yxyx"])
                if v > best:
                    best, best_j = v, j
        if best_j is not None and best >= threshold:
            used.add(best_j)
            found += 1
    return found


def refexp_accuracy(predicted_box, target_box, threshold=0.5):
    """Referring-expression accuracy of one answer: 1 if the predicted box (the first the answer
    gives) overlaps the target with IoU >= threshold, else 0; no box (None) scores 0. RefCOCO's
    "accuracy@0.5" is its mean."""
    if predicted_box is None:
        return 0.0
    return float(box_iou(predicted_box, target_box) >= threshold)
