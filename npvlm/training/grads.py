"""Gradients of the PaliGemma training loss for a chosen set of parameters (docs/training.md).

    loss, grads = loss_and_grads(batch, params, cfg, train="attention")

`train` names the trained parameters: a preset ("all", "decoder", "attention"; "lora" for the
adapters of the weights npvlm/training/lora.py wrapped) or a predicate on parameter names, the dotted
paths of the parameter tree (npvlm/tree.py), e.g. "text.layers.3.self_attn.q_proj.weight",
"vision.position_embedding.weight", "projector.bias".
Frozen parts cost nothing they need not: `save_plan` marks every module whose parameters are
frozen, so its forward keeps only what the input gradient needs and its backward computes no
weight gradient; a frozen vision tower keeps nothing and no backward runs into it (nor into the
projector, when it is frozen too).
"""

import re

import numpy as np

from .. import cpu
from ..backend import array_module
from ..errors import InputError
from ..loading.bf16 import BF16Matrix
from ..model.paligemma import backward, forward_loss
from ..tree import flatten, map_with_path, unflatten
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
            raise InputError("training set 'lora' but no weight carries LoRA adapters (npvlm.training.lora.add_lora)")
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
    """{"<module>.lora_A": A, "<module>.lora_B": B} of every LoraWeight (npvlm/training/lora.py):
    the arrays LoRA trains, named as `linear_backward` names their gradients."""
    out = {}
    for name, w in flatten(params).items():
        if isinstance(w, LoraWeight):
            module = name.removesuffix(".weight")
            out[f"{module}.lora_A"], out[f"{module}.lora_B"] = w.A, w.B
    return out


def save_plan(params, train):
    """The root `save` dict of a training pass (paligemma.forward_loss) for the parameters that
    `train` names (npvlm/model/record.py: what a plan says). It mirrors the parameter tree, one
    dict per module; the tied embedding is planned twice, as the lookup ("text.embed_tokens")
    and as the lm_head ("text.lm_head"). When nothing in the vision tower trains it is None (no
    backward runs into it), and so is the projector when it is frozen too."""
    wanted = trainable(train, params)
    names = list(flatten(params))
    if not any(wanted(n) for n in names):
        raise InputError("no parameter is trained: the training set selects none of the model's "
                         "parameters")
    modules = {}                                   # module path -> its parameters' names
    for name in names:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, []).append(leaf)
    plan = unflatten({module: _module_plan(module, leaves, wanted) for module, leaves in modules.items()})
    plan["text"]["lm_head"] = dict(plan["text"]["embed_tokens"])
    if not any(wanted(n) for n in names if n.startswith("vision.")):
        plan["vision"] = None
        if not any(wanted(n) for n in names if n.startswith("projector.")):
            plan["projector"] = None
    return plan


def _module_plan(module, leaves, wanted):
    """{"frozen": True}, {"only": names} or {}: which of a module's parameters train."""
    trained = tuple(leaf for leaf in leaves if wanted(f"{module}.{leaf}"))
    if not trained:
        return {"frozen": True}
    return {} if len(trained) == len(leaves) else {"only": trained}


def with_fp32_masters(params, train):
    """The parameter tree with every trained tensor as an fp32 array (its "master" copy, which an
    optimizer updates), the frozen ones left as they are (e.g. bfloat16 BF16Matrix weights,
    `npvlm.load(..., weights="bf16")`, which then cost half the memory)."""
    wanted = trainable(train, params)
    return map_with_path(lambda name, w: w.to_f32() if wanted(name) and isinstance(w, BF16Matrix) else w, params)


def loss_and_grads(batch, params, cfg, train="all", reduction="example", *, trace=None):
    """One forward and backward pass: (loss as a Python float, grads mirroring `params` with the
    trained tensors only). trace: the forward's stage outputs and the gradients arriving at them
    ("grad." + stage name), host copies."""
    if array_module(batch["input_ids"]) is np:
        cpu.settle()                      # BLAS's threads: the latest model's choice (made now if none)
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
