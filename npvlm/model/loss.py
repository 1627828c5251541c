"""The PaliGemma training loss: next-token cross-entropy on the suffix only (docs/training.md).

Axes (npvlm/model/layers.py): B batch, T sequence, V vocab; n the number of predicted tokens.

A training row is `<image>*N <bos> prefix "\\n" suffix <eos> [pad]` (left-padded in a batch), with
labels as transformers' PaliGemmaProcessor gives them: the token id on suffix tokens (eos
included), -100 elsewhere. Position t predicts labels[t+1]: the prefix carries no loss (the
PaliGemma paper measured that a loss on the prefix hurts transfer). Two reductions:

    "example"  mean over each example's suffix tokens, then mean over the batch
               (big_vision's fine-tuning notebook)
    "token"    mean over every suffix token of the batch (HF's `labels=` loss)
"""

import numpy as np

from ..backend import array_module
from ..config import IGNORE_INDEX
from ..errors import InputError
from .layers import at_least_f32

REDUCTIONS = ("example", "token")


def loss_positions(labels):
    """Where the loss is taken, from labels int[B, T] (host): (rows, cols, targets), each int[n]:
    position (rows, cols) predicts token `targets` = labels[rows, cols + 1]."""
    labels = np.asarray(labels)
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    return rows, cols, labels[rows, cols + 1]


def token_weights(rows, batch, reduction):
    """Each predicted token's weight in the reduced loss, float64[n]: 1/n for "token",
    1/(B n_b) for "example" (n_b: the tokens of its example)."""
    if reduction not in REDUCTIONS:
        raise InputError(f"loss reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    counts = np.bincount(rows, minlength=batch)
    if (counts == 0).any():
        raise InputError(f"example(s) {np.flatnonzero(counts == 0).tolist()} of the batch have no "
                         "suffix tokens to predict (labels all -100)")
    if reduction == "token":
        return np.full(len(rows), 1.0 / len(rows))
    return 1.0 / (batch * counts[rows])


def cross_entropy(logits, targets, weights, *, save=None):
    """sum_i weights_i * (logsumexp(z_i) - z_i[target_i]), in fp32 (fp64 for fp64 logits).
    logits: [n, V], targets: int[n], weights: float[n] (all on the logits' backend) -> a 0-d array."""
    xp = array_module(logits)
    z = logits.astype(at_least_f32(logits), copy=False)
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    total = e.sum(axis=-1, keepdims=True)
    nll = (xp.log(total) + m)[:, 0] - z[xp.arange(z.shape[0]), targets]          # [n]
    if save is not None:
        save.update(probs=e / total, targets=targets, weights=weights)
    return (weights * nll).sum()


def cross_entropy_backward(dloss, saved):
    """d/dz of the weighted cross-entropy: dloss weights_i (softmax(z_i) - onehot(target_i)).
    dloss: a number (1 for the loss itself) -> dlogits [n, V]"""
    xp = array_module(saved["probs"])
    d = saved["probs"] * saved["weights"][:, None]
    n = d.shape[0]
    d[xp.arange(n), saved["targets"]] -= saved["weights"]
    return d * dloss
