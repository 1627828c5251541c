"""Building blocks shared by the vision tower and the text decoder: pure functions over arrays.

Axis legend (used in every shape comment of npvlm):
    B batch, C channels, P patch side, N image tokens, T query length, S key length,
    D width, F MLP width, Hq query heads, Hk key/value heads, G = Hq // Hk, E head dim, V vocab.

Every function takes its array module from its input (`xp = array_module(x)`), so the same code
runs on NumPy and CuPy. Reductions (norm statistics, softmax) run in fp32.
"""

import math

from .backend import array_module
from .bf16 import matmul_t


def linear(x, weight, bias=None):
    """x @ W^T + b, W in PyTorch's Linear layout [out, in] (as in the checkpoint, so every weight
    equals HF's tensor). The transpose is a free view: BLAS reads W^T directly, at the same speed
    as a pre-transposed copy, for matrices (prefill) and vectors (decode) alike.
    W may also be a `bf16.BF16Matrix` (weights="bf16"), widened block by block.
    # [..., in] -> [..., out]"""
    y = matmul_t(x, weight)
    if bias is not None:
        y += bias
    return y


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis with biased variance (SigLIP).  # [..., D] -> [..., D]"""
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered * (1.0 / xp.sqrt(var + eps)) * weight + bias


def rms_norm(x, weight, eps):
    """Gemma RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), in fp32 (HF `GemmaRMSNorm`; the weight
    is stored as an offset from 1, so a zero weight is the identity scale).  # [..., D] -> [..., D]"""
    xp = array_module(x)
    x32 = x.astype(xp.float32, copy=False)
    inv_rms = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + eps)
    return (x32 * inv_rms * (1.0 + weight.astype(xp.float32, copy=False))).astype(x.dtype, copy=False)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    """GELU, tanh approximation (`gelu_pytorch_tanh`):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Computed in place in one scratch array: on the MLP activations ([T, F], the largest
    elementwise work in prefill) each temporary would cost a full pass over memory. Same
    operations in the same order as the formula, so the same rounding."""
    xp = array_module(x)
    t = x * x
    t *= x
    t *= 0.044715
    t += x
    t *= _SQRT_2_OVER_PI
    xp.tanh(t, out=t)
    t += 1.0
    t *= x
    t *= 0.5          # exact (a power of two), so equal to multiplying 0.5 * x first
    return t


def softmax(x, axis=-1):
    """Numerically stable softmax in fp32, cast back to the input dtype."""
    xp = array_module(x)
    x32 = x.astype(xp.float32, copy=False)
    e = xp.exp(x32 - x32.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype, copy=False)


def softcap(x, cap):
    """Gemma 2 soft capping: cap * tanh(x / cap) keeps |x| < cap smoothly."""
    xp = array_module(x)
    return cap * xp.tanh(x / cap)
