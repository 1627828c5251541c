"""What a forward pass records: `save`, what its backward needs, and `trace`, its named outputs.

Every forward function in npvlm/model takes both as keyword-only arguments, None by default
(record nothing, the inference path).

save: one dict per module, filled by the forward, read by the matching `_backward`
-----------------------------------------------------------------------------------
A forward gives each sub-module its own dict, `sub(save, name)`, named as the sub-module's
parameters are, so the save dicts mirror the parameter tree (`save["text"]["layers"][3]
["self_attn"]["q_proj"]` is q_proj's); "layers" holds one dict per stacked layer
(`layer_saves`). A training pass starts from a *save plan* (npvlm/training/grads.py) and
`paligemma.backward` reads the filled dicts back, last layer first. A dict holds three kinds
of entry:

    plan         set before the pass, on modules with parameters:
                   {"frozen": True}         no parameter of the module trains: the forward keeps
                                            only what the input gradient needs (a frozen linear
                                            keeps nothing) and the backward computes no weight
                                            gradient
                   {"only": ("weight",)}    only these parameters train (a weight, not its bias)
                   {}                       every parameter trains
                 A whole subtree planned as None (a frozen vision tower) keeps nothing, and no
                 backward runs into it.
    activations  set by the forward, named in its docstring: linear "x"; layer_norm "normed",
                 "inv_std"; rms_norm "x", "inv_rms"; gelu_tanh "x"; attention "q", "k", "v",
                 "probs", "capped"; geglu "up"; merge_embeddings "ids", "is_image",
                 "image_shape"; lm_head "capped"; cross_entropy "probs", "targets", "weights";
                 forward_loss "inputs"
    sub-dicts    one per sub-module: its parameter name ("self_attn", "mlp", "q_proj", "norm",
                 "embed_tokens", ...), or "attn" (attention's own), "gelu", "layers" (one per
                 stacked layer), "lm_head" (the tied embedding as the output layer), "loss"

Read them through the helpers below: `is_trained(saved)` (the module is not frozen),
`trains(saved, name)` (its parameter `name` gets a gradient), `attention_probs(layer_saved)`.

trace: named stage outputs, as host (NumPy) copies
---------------------------------------------------
A forward given `trace={}` records every stage under the names the golden files use:

    vision.embed, vision.layer.NN, vision.post_norm, projector,
    text.embed, text.layer.NN, text.final_norm, logits

and every layer's attention probabilities, `vision.attn.NN` [B, H, N, N] and `text.attn.NN`
[B, Hq, T, S] (HF's eager `attn_weights`; S = T in a prefill, the cache length in a decode
step): the `probs` that attention keeps in its save dict. When only tracing, each layer gets a
fresh save dict (`layer_saves`) that is dropped once its map is recorded. A backward given a
trace records the gradient arriving at each stage's output as "grad." + the stage's name.
"""

import numpy as np

from ..backend import to_host

# ---- save ---------------------------------------------------------------------------------------


def sub(save, name):
    """The dict in which sub-module `name` keeps what its backward needs (None: keep nothing)."""
    return None if save is None else save.setdefault(name, {})


def is_trained(saved):
    """Whether the module's parameters get gradients: it was saved, and not planned frozen."""
    return saved is not None and not saved.get("frozen")


def trains(saved, name):
    """Whether the module's parameter `name` ("weight", "bias") gets a gradient: the module is
    trained, and its plan does not name only other parameters ({"only": names}: a module trained
    in part, e.g. a weight without its bias)."""
    return is_trained(saved) and name in saved.get("only", (name,))


def layer_saves(save, trace, n):
    """The save dict of each of n stacked layers: those in `save["layers"]` when training; a
    fresh one per layer when only tracing (the attention map is read from it, then it is
    dropped); None when neither."""
    if save is not None:
        return save.setdefault("layers", [{} for _ in range(n)])
    return ({} if trace is not None else None for _ in range(n))


def attention_probs(layer_saved):
    """The attention probabilities [B, Hq, T, S] a layer's forward kept (None if not saved)."""
    return None if layer_saved is None else layer_saved["self_attn"]["attn"]["probs"]


# ---- trace --------------------------------------------------------------------------------------


def record(trace, name, x):
    """Store a host copy of `x` under `name` when tracing (trace is a dict, or None = off)."""
    if trace is not None:
        trace[name] = np.array(to_host(x), copy=True)


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
