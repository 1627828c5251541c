"""Segmentation metrics: the IoU of two masks and its mean over examples (RefCOCO's mIoU, as
big_vision's segmentation evaluator computes it: an example's IoU in the full image, 0 for an
answer that gives no valid mask, averaged over examples)."""

import numpy as np


def mask_iou(predicted, target):
    """|p ∧ t| / |p ∨ t| of two boolean masks of the same shape (anything nonzero is in the
    mask). Both empty: 1.0 (nothing to find, nothing found; big_vision's targets are never
    empty). A predicted mask of None scores 0."""
    if predicted is None:
        return 0.0
    p, t = np.asarray(predicted) != 0, np.asarray(target) != 0
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: predicted {p.shape}, target {t.shape}")
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def miou(predicted, targets):
    """The mean of mask_iou over examples: mean_i |p_i ∧ t_i| / |p_i ∨ t_i| (a mean of ratios, not
    the ratio of summed areas); None for an answer without a valid mask counts 0."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predicted masks but {len(targets)} targets")
    if not len(targets):
        raise ValueError("no masks to score")
    return float(np.mean([mask_iou(p, t) for p, t in zip(predicted, targets)]))
