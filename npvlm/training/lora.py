"""LoRA (Hu et al. 2021, arXiv 2106.09685) as the `peft` library does it: a frozen weight W plus a
trained low-rank update,

    y = x W^T + (alpha / r) (x A^T) B^T            A: [r, I], B: [O, r]

A starts random (PEFT's default: kaiming-uniform, U(-1/sqrt(I), 1/sqrt(I))) and B at zero, so
step 0 is exactly the base model. Target modules are named as PEFT names them: every linear
layer whose last name is in the list (with transformers' PaliGemma recipe, `q_proj`, `k_proj`,
`v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`: the decoder's, and SigLIP's q/k/v).
On export the update is merged into W (`merged`).

A `LoraWeight` stands where the weight matrix stood and behaves like one in `x @ W.T` and
`dy @ W` (as a BF16Matrix does, npvlm/bf16.py), so the model math is unchanged; `grads` gives
the gradients of A and B that `layers.linear_backward` asks such a weight for.
"""

import math

import numpy as np

from ..backend import array_module

PEFT_RECIPE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _dense(w):
    """A weight as an fp32 array (a BF16Matrix widened)."""
    return w.to_f32() if hasattr(w, "to_f32") else w


class LoraWeight:
    """W (frozen: an array or a BF16Matrix) + scale * B @ A, with A [r, I] and B [O, r] trained."""

    __array_ufunc__ = None      # `ndarray @ LoraWeight` defers to __rmatmul__

    def __init__(self, base, A, B, scale):
        self.base, self.A, self.B, self.scale = base, A, B, scale
        self.shape, self.ndim, self.dtype = base.shape, 2, np.dtype(np.float32)

    @property
    def T(self):
        return _Transposed(self)

    def __rmatmul__(self, dy):
        """dy @ W_eff = dy W + scale (dy B) A: the input gradient.  [..., O] -> [..., I]"""
        return dy @ self.base + self.scale * ((dy @ self.B) @ self.A)

    def grads(self, dy, x):
        """The trained adapters' gradients, summed over every leading axis:
        dA = scale (dy B)^T x  [r, I],   dB = scale dy^T (x A^T)  [O, r]."""
        return {"lora_A": self.scale * (_rows(dy @ self.B).T @ _rows(x)),
                "lora_B": self.scale * (_rows(dy).T @ _rows(x @ self.A.T))}

    def merged(self):
        """W + scale * B @ A as one fp32 matrix [O, I] (what the exported checkpoint holds)."""
        return _dense(self.base) + self.scale * (self.B @ self.A)

    def __repr__(self):
        return f"LoraWeight({list(self.shape)}, r={self.A.shape[0]}, scale={self.scale:g})"


class _Transposed:
    __array_ufunc__ = None

    def __init__(self, w):
        self.w = w

    def __rmatmul__(self, x):
        """x @ W_eff^T = x W^T + scale (x A^T) B^T.  [..., I] -> [..., O]"""
        w = self.w
        return x @ w.base.T + w.scale * ((x @ w.A.T) @ w.B.T)


def targets_of(params, targets):
    """Dotted names of the linear modules LoRA wraps: 2-D weights whose module's last name is
    in `targets` (PEFT's matching)."""
    out = []

    def walk(node, prefix):
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif isinstance(node, dict):
            if "weight" in node and getattr(node["weight"], "ndim", 0) == 2 and prefix[:-1].split(".")[-1] in targets:
                out.append(prefix[:-1])
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    walk(v, f"{prefix}{k}.")
    walk(params, "")
    return out


def _module(params, name):
    node = params
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def add_lora(params, rank=8, alpha=8, targets=PEFT_RECIPE, seed=0):
    """Wrap the target linears' weights in LoraWeights, in place (A random, B zero). Returns the
    wrapped module names."""
    rng = np.random.default_rng(seed)
    names = targets_of(params, targets)
    for name in names:
        module = _module(params, name)
        W = module["weight"]
        O, I = W.shape
        xp = array_module(W)            # numpy for a BF16Matrix, cupy for a weight on the GPU
        bound = 1.0 / math.sqrt(I)
        A = xp.asarray(rng.uniform(-bound, bound, (rank, I)).astype(np.float32))
        B = xp.zeros((O, rank), np.float32)
        module["weight"] = LoraWeight(W, A, B, alpha / rank)
    return names


def merge(params):
    """The parameter tree with every LoraWeight replaced by its merged fp32 matrix."""
    if isinstance(params, dict):
        return {k: merge(v) for k, v in params.items()}
    if isinstance(params, list):
        return [merge(v) for v in params]
    return params.merged() if isinstance(params, LoraWeight) else params
