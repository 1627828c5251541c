"""What a forward pass records: named stage outputs (`trace`).

A forward pass given `trace={}` fills it with host (NumPy) copies of every stage under stable
names, the same names the golden files use:

    vision.embed, vision.layer.NN, vision.post_norm, projector,
    text.embed, text.layer.NN, text.final_norm, logits

and the attention probabilities of every layer, `vision.attn.NN` [B, H, N, N] and `text.attn.NN`
[B, Hq, T, S] (HF's eager `attn_weights`; S = T in a prefill, the cache length in a decode step).
"""

import numpy as np

from ..backend import to_host


def vision_stage_names(n_layers):
    """The vision tower's traced stage outputs, in forward order."""
    return ["vision.embed"] + [f"vision.layer.{i:02d}" for i in range(n_layers)] + ["vision.post_norm"]


def text_stage_names(n_layers):
    """The decoder's traced stage outputs, in forward order."""
    return ["text.embed"] + [f"text.layer.{i:02d}" for i in range(n_layers)] + ["text.final_norm", "logits"]


def stage_names(n_vision_layers, n_text_layers):
    """Every traced stage output in forward order (the attention maps aside): the list that
    tests, goldens and notebooks compare."""
    return vision_stage_names(n_vision_layers) + ["projector"] + text_stage_names(n_text_layers)


def record(trace, name, x):
    """Store a host copy of `x` under `name` when tracing (trace is a dict, or None = off)."""
    if trace is not None:
        trace[name] = np.array(to_host(x), copy=True)


def layer_saves(save, trace, n):
    """The `save` dict of each of n stacked layers: the ones in `save["layers"]` when training;
    a fresh one per layer when only tracing (the attention maps are read from it, then it is
    dropped); None when neither."""
    if save is not None:
        return save.setdefault("layers", [{} for _ in range(n)])
    return ({} if trace is not None else None for _ in range(n))
