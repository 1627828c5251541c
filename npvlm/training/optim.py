"""Optimizers, gradient clipping and learning-rate schedules: explicit array math with PyTorch's
semantics (torch.optim.SGD, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, and the
warm-up + cosine schedule of transformers' `get_cosine_schedule_with_warmup`).

Every optimizer updates a dict {name: array} in place from a dict of gradients of the same
names; its state (momentum, moments, step count) is a dict of arrays too, so it can be saved and
resumed exactly (`state_dict` / `load_state_dict`).
"""

import math

from ..backend import array_module
from ..errors import InputError

SCHEDULES = ("constant", "cosine")


def lr_at(step, total, base_lr, schedule="constant", warmup=0):
    """The learning rate of optimizer step `step` (0-based) of `total`:
    warm-up   base_lr * step / warmup             for step < warmup (so step 0 takes lr 0)
    constant  base_lr                             after the warm-up
    cosine    base_lr * 0.5 (1 + cos(pi t))       t = (step - warmup) / (total - warmup)
    as transformers' get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup."""
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def global_norm(grads):
    """sqrt(sum of every gradient entry squared), as a Python float (one sync on a GPU)."""
    return math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads.values()))


def clip_grad_norm(grads, max_norm):
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) in place, as
    torch.nn.utils.clip_grad_norm_; max_norm 0 means no clipping. Returns the norm before."""
    norm = global_norm(grads)
    if max_norm and max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for g in grads.values():
                g *= scale
    return norm


class SGD:
    """torch.optim.SGD on each trained array w: g' = g + wd w;  buf = momentum buf + g' (buf = g'
    at the first step);  w -= lr buf (or w -= lr g' without momentum)."""

    def __init__(self, momentum=0.0, weight_decay=0.0):
        self.momentum, self.weight_decay = momentum, weight_decay
        self.state = {"step": 0}

    def step(self, params, grads, lr):
        for name, g in grads.items():
            w = params[name]
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                buf = self.state.get(f"momentum.{name}")
                if buf is None:
                    buf = self.state[f"momentum.{name}"] = g.astype(w.dtype, copy=True)
                else:
                    buf *= self.momentum
                    buf += g
                g = buf
            w -= lr * g
        self.state["step"] += 1

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments) on each trained array w:
    w *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.state = {"step": 0}

    def step(self, params, grads, lr):
        t = self.state["step"] + 1
        c1, c2 = 1.0 - self.b1 ** t, 1.0 - self.b2 ** t
        for name, g in grads.items():
            w = params[name]
            xp = array_module(w)
            m = self.state.setdefault(f"exp_avg.{name}", xp.zeros_like(w))
            v = self.state.setdefault(f"exp_avg_sq.{name}", xp.zeros_like(w))
            if self.weight_decay:
                w *= 1.0 - lr * self.weight_decay
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            denom = xp.sqrt(v) / math.sqrt(c2) + self.eps
            w -= (lr / c1) * (m / denom)
        self.state["step"] = t

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)
