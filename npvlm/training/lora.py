"""LoRA (Hu et al. 2021, arXiv 2106.09685) as the `peft` library does it: a frozen weight W plus a
trained low-rank update,

    y = x W^T + (alpha / r) (x A^T) B^T            A: [r, I], B: [O, r]

A starts random (PEFT's default: kaiming-uniform, U(-1/sqrt(I), 1/sqrt(I))) and B at zero, so
step 0 is exactly the base model. Target modules are named as PEFT names them: every linear
layer whose last name is in the list (with transformers' PaliGemma recipe, `q_proj`, `k_proj`,
`v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`: the decoder's, and SigLIP's q/k/v).
On export the update is merged into W (`LoraWeight.to_f32`, which the checkpoint writer calls).

A `LoraWeight` stands where the weight matrix stood and behaves like one in `x @ W.T` and
`dy @ W` (as a BF16Matrix does, npvlm/loading/bf16.py, whose `Transposed` it shares), so the
model math is unchanged; `grads` gives the gradients of A and B that `layers.linear_backward`
asks such a weight for, and `to_f32` the merged matrix a checkpoint stores.
"""

import math

import numpy as np

from ..backend import array_module
from ..loading.bf16 import Transposed
from ..model.layers import rows
from ..tree import flatten, map_with_path

PEFT_RECIPE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraWeight:
    """W (frozen: an array or a BF16Matrix) + scale * B @ A, with A [r, I] and B [O, r] trained."""

    __array_ufunc__ = None      # `ndarray @ LoraWeight` defers to __rmatmul__

    def __init__(self, base, A, B, scale):
        self.base, self.A, self.B, self.scale = base, A, B, scale
        self.shape, self.ndim, self.dtype = base.shape, 2, np.dtype(np.float32)

    @property
    def T(self):
        return Transposed(self)

    def matmul_transposed(self, x):
        """x @ W_eff^T = x W^T + scale (x A^T) B^T.  [..., I] -> [..., O]"""
        return x @ self.base.T + self.scale * ((x @ self.A.T) @ self.B.T)

    def __rmatmul__(self, dy):
        """dy @ W_eff = dy W + scale (dy B) A: the input gradient.  [..., O] -> [..., I]"""
        return dy @ self.base + self.scale * ((dy @ self.B) @ self.A)

    def grads(self, dy, x):
        """The trained adapters' gradients, summed over every leading axis:
        dA = scale (dy B)^T x  [r, I],   dB = scale dy^T (x A^T)  [O, r]."""
        return {"lora_A": self.scale * (rows(dy @ self.B).T @ rows(x)),
                "lora_B": self.scale * (rows(dy).T @ rows(x @ self.A.T))}

    def to_f32(self):
        """W + scale * B @ A as one fp32 matrix [O, I] (what an exported checkpoint holds)."""
        base = self.base.to_f32() if hasattr(self.base, "to_f32") else self.base
        return base + self.scale * (self.B @ self.A)

    def __repr__(self):
        return f"LoraWeight({list(self.shape)}, r={self.A.shape[0]}, scale={self.scale:g})"


def targets_of(params, targets):
    """Paths of the weights LoRA wraps: 2-D weights whose module's last name is in `targets`
    (PEFT's matching), e.g. "text.layers.3.self_attn.q_proj.weight"."""
    return [name for name, w in flatten(params).items()
            if name.endswith(".weight") and getattr(w, "ndim", 0) == 2
            and name.removesuffix(".weight").rpartition(".")[2] in targets]


def add_lora(params, rank=8, alpha=8, targets=PEFT_RECIPE, seed=0):
    """The parameter tree with the target linears' weights wrapped in LoraWeights (A random, B
    zero), and the wrapped modules' names."""
    rng = np.random.default_rng(seed)
    names = targets_of(params, targets)

    def wrap(name, W):
        if name not in names:
            return W
        O, I = W.shape
        xp = array_module(W)            # numpy for a BF16Matrix, cupy for a weight on the GPU
        bound = 1.0 / math.sqrt(I)
        A = xp.asarray(rng.uniform(-bound, bound, (rank, I)).astype(np.float32))
        return LoraWeight(W, A, xp.zeros((O, rank), np.float32), alpha / rank)
    return map_with_path(wrap, params), [name.removesuffix(".weight") for name in names]

