"""Gradients of the PaliGemma training loss for a chosen set of parameters (docs/training.md).

    loss, grads = loss_and_grads(batch, params, cfg, train="attention")

`train` names the trained parameters: a preset ("all", "decoder", "attention"; "lora" for the
adapters of the weights npvlm/lora.py wrapped) or a predicate on parameter names, the dotted
paths of the parameter tree (`flatten`), e.g. "text.layers.3.self_attn.q_proj.weight",
"vision.position_embedding", "projector.bias".
Frozen parts cost nothing they need not: `save_plan` marks every module whose parameters are
frozen, so its forward keeps only what the input gradient needs and its backward computes no
weight gradient; a frozen vision tower keeps nothing and no backward runs into it (nor into the
projector, when it is frozen too).
"""

import re

import numpy as np

from ..backend import array_module
from ..errors import InputError
from ..loading.bf16 import BF16Matrix
from ..model.paligemma import backward, forward_loss
from .lora import LoraWeight

PRESETS = {
    "all": lambda name: True,
    # everything but the vision tower and the projector
    "decoder": lambda name: name.startswith("text."),
    # the q/k/v/o projections of every decoder layer (big_vision's fine-tuning notebook)
    "attention": lambda name: re.fullmatch(r"text\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight", name) is not None,
}


TRAIN_SETS = (*PRESETS, "lora")


def trainable(train, params=None):
    """A predicate on parameter names from a preset name or a predicate ("lora": the weights
    of `params` that are LoraWeights, whose adapters train)."""
    if callable(train):
        return train
    if train == "lora" and params is not None:
        wrapped = {n for n, w in flatten(params).items() if isinstance(w, LoraWeight)}
        if not wrapped:
            raise InputError("training set 'lora' but no weight carries LoRA adapters (npvlm.lora.add_lora)")
        return wrapped.__contains__
    if train not in PRESETS:
        raise InputError(f"unknown training set {train!r}; choose one of {', '.join(TRAIN_SETS)}")
    return PRESETS[train]


def trained_arrays(params, train):
    """{name: array} of what an optimizer updates, in place: the trained tensors (the adapters
    A and B, "<module>.lora_A" / ".lora_B", for "lora"), named as the gradients are."""
    if train == "lora":
        return adapters(params)
    wanted = trainable(train, params)
    return {n: a for n, a in flatten(params).items() if wanted(n)}


def adapters(params):
    """{"<module>.lora_A": A, "<module>.lora_B": B} of every LoraWeight (npvlm/lora.py): the
    arrays LoRA trains, named as `linear_backward` names their gradients."""
    out = {}
    for name, w in flatten(params).items():
        if isinstance(w, LoraWeight):
            module = name.removesuffix(".weight")
            out[f"{module}.lora_A"], out[f"{module}.lora_B"] = w.A, w.B
    return out


def flatten(tree, prefix=""):
    """{dotted name: array} of every array of a nested dict/list tree (parameters or grads)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    elif tree is not None:
        out[prefix[:-1]] = tree
    return out


def _is_module(node):
    """A dict of arrays (a Linear's or a norm's parameters), not a dict of sub-modules."""
    return isinstance(node, dict) and node and not any(isinstance(v, (dict, list)) for v in node.values())


def _plan(node, prefix, wanted):
    """The save dicts of one subtree: {"frozen": True} for each frozen module, {} for trained."""
    if isinstance(node, list):
        return [_plan(v, f"{prefix}{i}.", wanted) for i, v in enumerate(node)]
    if _is_module(node):
        trained = [k for k in node if wanted(prefix + k)]
        if not trained:
            return {"frozen": True}
        return {} if len(trained) == len(node) else {"only": tuple(trained)}
    if isinstance(node, dict):
        return {k: _plan(v, f"{prefix}{k}.", wanted) for k, v in node.items()}
    return {} if wanted(prefix[:-1]) else {"frozen": True}           # a bare array


def save_plan(params, train):
    """The root `save` dict of a training pass (paligemma.forward_loss) for the parameters that
    `train` names. The save dicts mirror the parameter tree: the text decoder's tied embedding is
    saved as its lm_head ("text.lm_head")."""
    wanted = trainable(train, params)
    names = flatten(params)
    if not any(wanted(n) for n in names):
        raise InputError("no parameter is trained: the training set selects none of the model's "
                         "parameters")
    plan = {key: _plan(params[key], f"{key}.", wanted) for key in ("vision", "projector", "text")}
    plan["text"]["lm_head"] = plan["text"].pop("embed_tokens")
    vision = any(wanted(n) for n in names if n.startswith("vision."))
    if not vision:                                   # no backward runs into the vision tower
        plan["vision"] = None
        if not any(wanted(n) for n in names if n.startswith("projector.")):
            plan["projector"] = None                 # nor into the projector
    return plan


def with_fp32_masters(params, train):
    """The parameter tree with every trained tensor as an fp32 array (its "master" copy, which an
    optimizer updates), the frozen ones left as they are (e.g. bfloat16 BF16Matrix weights,
    `npvlm.load(..., weights="bf16")`, which then cost half the memory)."""
    wanted = trainable(train, params)

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{prefix}{i}.") for i, v in enumerate(node)]
        if wanted(prefix[:-1]) and isinstance(node, BF16Matrix):
            return node.to_f32()
        return node
    return walk(params, "")


def loss_and_grads(batch, params, cfg, train="all", reduction="example", *, trace=None):
    """One forward and backward pass: (loss as a Python float, grads mirroring `params` with the
    trained tensors only). trace: the forward's stage outputs and the gradients arriving at them
    ("grad." + stage name), host copies."""
    saved = save_plan(params, train)
    loss = forward_loss(batch, params, cfg, reduction, save=saved, trace=trace)
    grads = backward(saved, params, cfg, trace=trace)
    return float(loss), grads


def check_finite(loss, grads):
    """Refuse a step whose loss or gradients are not finite (NaN or inf)."""
    if not np.isfinite(loss):
        raise InputError(f"the loss is {loss}: not a finite number")
    bad = [n for n, g in flatten(grads).items() if not bool(array_module(g).isfinite(g).all())]
    if bad:
        raise InputError(f"non-finite gradients in {len(bad)} tensor(s), first {bad[0]}")
