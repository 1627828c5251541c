"""Building blocks shared by the vision tower and the text decoder: pure functions over arrays.

The axis legend, used by every shape comment in npvlm (docs/architecture.md repeats it):

    B  batch                         T  tokens in this pass (queries)
    S  keys: cached + new tokens (S = T in a prefill or a training pass)
    C  image channels (3)            R  model image side in pixels (224 / 448 / 896)
    P  patch side (14)               N  image tokens per image, (R / P)^2
    H, W  height and width of an input image or mask, in pixels
    D  width (model dimension; D_v the vision tower's where both appear)
    F  MLP width                     V  vocabulary
    Hq query heads    Hk key/value heads    G = Hq / Hk query heads per K/V head    E  head dim
    O, I  output and input features of a weight matrix [O, I] (PyTorch's Linear layout)

Every function takes its array module from its input (`xp = array_module(x)`), so the same code
runs on NumPy and CuPy. Reductions (norm statistics, softmax) run in fp32.

Training: each forward `f(x, p, cfg, ..., *, save=None)` has its backward right after it,

    f_backward(dy, saved, p, cfg, ...) -> (dx, grads)

the forward's arguments with the upstream gradient `dy` (shaped as f's output) for x and the
dict f filled for `save` (npvlm/model/record.py: what is kept, and the save plan that marks a
module frozen). It returns the input gradient and the parameter gradients, named as the
parameters (empty when frozen). Where f splats its parameters (`linear(x, weight, bias)`), so
does its backward. A function without parameters returns dx alone; docs/training.md lists these
and the other exceptions.
"""

import math

from ..backend import array_module
from .record import is_trained, trains


def rows(a):
    """[..., n] -> [rows, n]: every leading axis is a row (a batch of vectors)."""
    return a.reshape(-1, a.shape[-1])


def linear(x, weight, bias=None, *, save=None):
    """x @ W^T + b, with W in PyTorch's Linear layout [O, I], as in the checkpoint, so every weight
    equals HF's tensor. The transpose is a free view: BLAS reads W^T directly, at the speed of a
    pre-transposed copy. W may be any matrix type that supports `x @ W.T` (npvlm/loading/bf16.py).
    save: keeps x for the weight gradient, unless the dict says {"frozen": True}
    ({"only": ("weight",)}: the bias is frozen).
    # [..., I] -> [..., O]"""
    if is_trained(save):
        save["x"] = x
    # one GEMM over every row: NumPy's matmul of a [B, T, I] array runs one GEMM per batch row
    y = (rows(x) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y += bias
    return y


def linear_backward(dy, saved, weight, bias=None, *, need_dx=True):
    """y = x W^T + b:  dx = dy W;  dW = dy^T x and db = sum(dy), both summed over every leading
    axis, only when the forward kept x (W trained). A weight with its own `grads` (a LoRA
    weight, npvlm/training/lora.py) gives its adapters' gradients instead of dW.
    dy: [..., O] -> dx [..., I] (None if not need_dx), {"weight": [O, I], "bias": [O]}"""
    dx = (rows(dy) @ weight).reshape(*dy.shape[:-1], weight.shape[1]) if need_dx else None
    grads = {}
    if trains(saved, "weight"):                   # the forward kept x
        x = saved["x"]
        grads.update(weight.grads(dy, x) if hasattr(weight, "grads")
                     else {"weight": rows(dy).T @ rows(x)})            # [O, R] @ [R, I]
    if bias is not None and trains(saved, "bias"):
        grads["bias"] = rows(dy).sum(axis=0)
    return dx, grads


def layer_norm(x, weight, bias, eps, *, save=None):
    """LayerNorm over the last axis with biased variance (SigLIP): (x - mean) / sqrt(var + eps) * w + b.
    # [..., D] -> [..., D]"""
    xp = array_module(x)
    normed = x - x.mean(axis=-1, keepdims=True)                          # centered
    var = (normed * normed).mean(axis=-1, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)                                   # [..., 1]
    normed *= inv_std                 # in place here and below: fewer new [..., D] arrays
    if save is not None:
        save.update(normed=normed, inv_std=inv_std)
    y = normed * weight
    y += bias
    return y


def layer_norm_backward(dy, saved, weight, bias):
    """y = n w + b with n = (x - mean) s, s = 1/sqrt(var + eps):
    dn = dy w;  dx = s (dn - mean(dn) - n mean(dn n));  dw = sum(dy n), db = sum(dy) over every
    leading axis (not when frozen).  dy: [..., D] -> dx [..., D], {"weight": [D], "bias": [D]}"""
    n, s = saved["normed"], saved["inv_std"]
    dn = dy * weight
    dx = s * (dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True))
    grads = {}
    if trains(saved, "weight"):
        grads["weight"] = rows(dy * n).sum(axis=0)
    if trains(saved, "bias"):
        grads["bias"] = rows(dy).sum(axis=0)
    return dx, grads


def rms_norm(x, weight, eps, *, save=None):
    """Gemma RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), in fp32 (HF `GemmaRMSNorm`; the weight
    is stored as an offset from 1, so a zero weight is the identity scale).
    # [..., D] -> [..., D]"""
    xp = array_module(x)
    x32 = x.astype(at_least_f32(x), copy=False)
    inv_rms = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + eps)  # [..., 1]
    if save is not None:
        save.update(x=x32, inv_rms=inv_rms)
    y = x32 * inv_rms
    y *= 1.0 + weight.astype(x32.dtype, copy=False)
    return y.astype(x.dtype, copy=False)


def rms_norm_backward(dy, saved, weight):
    """y = x r (1 + w) with r = 1/sqrt(mean(x^2) + eps): with g = dy (1 + w),
    dx = r g - x r^3 mean(g x);  dw = sum(dy x r) over every leading axis (not when frozen).
    dy: [..., D] -> dx [..., D], {"weight": [D]}"""
    x, r = saved["x"], saved["inv_rms"]
    g = dy * (1.0 + weight.astype(x.dtype, copy=False))
    dx = r * g - x * (r * r * r) * (g * x).mean(axis=-1, keepdims=True)
    grads = {"weight": rows(dy * x * r).sum(axis=0)} if trains(saved, "weight") else {}
    return dx.astype(dy.dtype, copy=False), grads


def at_least_f32(x):
    """The dtype reductions run in: fp32, or fp64 for fp64 inputs (the finite-difference checks)."""
    xp = array_module(x)
    return xp.float64 if x.dtype == xp.float64 else xp.float32


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x, *, save=None):
    """GELU, tanh approximation (`gelu_pytorch_tanh`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Computed in place in one scratch array: on the MLP activations ([T, F], the largest
    elementwise work in a prefill) each temporary would cost a full pass over memory. Same
    operations in the same order as the formula, so the same rounding.
    save: keeps x (the backward recomputes the tanh: one pass instead of a [T, F] array)."""
    if save is not None:
        save["x"] = x
    t = gelu_tanh_inner(x)
    t += 1.0
    t *= x
    t *= 0.5          # exact (a power of two), so equal to multiplying 0.5 * x first
    return t


def gelu_tanh_inner(x):
    """tanh(sqrt(2/pi) (x + 0.044715 x^3)), in a new array (computed in place)."""
    xp = array_module(x)
    t = x * x
    t *= x
    t *= 0.044715
    t += x
    t *= _SQRT_2_OVER_PI
    xp.tanh(t, out=t)
    return t


def gelu_tanh_backward(dy, saved, tanh=None):
    """y = 0.5 x (1 + t), t = tanh(u), u = c (x + a x^3), c = sqrt(2/pi), a = 0.044715:
    dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2). `tanh`: t, when the caller has
    computed it already (else recomputed from the saved x).  dy: [...] -> dx [...]"""
    x = saved["x"]
    t = gelu_tanh_inner(x) if tanh is None else tanh
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x))


def softmax(x, axis=-1):
    """Numerically stable softmax in fp32, cast back to the input dtype."""
    xp = array_module(x)
    x32 = x.astype(at_least_f32(x), copy=False)
    e = x32 - x32.max(axis=axis, keepdims=True)           # a new array: the rest is in place
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e.astype(x.dtype, copy=False)


def softmax_backward(dy, probs, axis=-1):
    """probs = softmax(x):  dx = probs (dy - sum(dy probs)) along `axis`, from the forward's
    output (all it needs).  dy, probs: [...] -> dx [...]"""
    return probs * (dy - (dy * probs).sum(axis=axis, keepdims=True))


def softcap(x, cap):
    """Gemma 2 soft capping: cap * tanh(x / cap) keeps |x| < cap smoothly."""
    xp = array_module(x)
    return cap * xp.tanh(x / cap)


def softcap_backward(dy, y, cap):
    """y = cap tanh(x / cap):  dx = dy (1 - (y / cap)^2), from the forward's output y (all it
    needs; the caller keeps it).  [...] -> [...]"""
    return dy * (1.0 - (y / cap) ** 2)
