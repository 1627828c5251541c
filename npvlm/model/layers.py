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

Training: forward functions take `save=None`. Given a dict, they store in it what their
backward needs (docs/training.md); `sub(save, name)` gives a sub-module its own dict. A module
whose parameters get no gradient has the dict {"frozen": True}: a frozen linear keeps nothing,
a frozen norm keeps what the input gradient needs. Each `f` has an `f_backward` right after it:
it takes the upstream gradient `dy` (same shape as f's output) and what f saved, and returns the
input gradient and, for a layer with parameters, a dict of parameter gradients named as the
parameters (empty when frozen).
"""

import math

from ..backend import array_module


def sub(save, name):
    """The dict in which sub-module `name` keeps what its backward needs (None: keep nothing)."""
    return None if save is None else save.setdefault(name, {})


def _trained(saved):
    return saved is not None and not saved.get("frozen")


def _requested(grads, saved):
    """Only the parameters the save plan asks for: {"only": names} marks a module trained in
    part (e.g. a weight without its bias)."""
    only = saved.get("only") if saved is not None else None
    return grads if only is None else {k: v for k, v in grads.items() if k in only}


def _rows(a):
    """[..., n] -> [rows, n]: every leading axis is a row (a batch of vectors)."""
    return a.reshape(-1, a.shape[-1])


def linear(x, weight, bias=None, *, save=None):
    """x @ W^T + b, with W in PyTorch's Linear layout [O, I], as in the checkpoint, so every weight
    equals HF's tensor. The transpose is a free view: BLAS reads W^T directly, at the speed of a
    pre-transposed copy. W may be any matrix type that supports `x @ W.T` (npvlm/bf16.py).
    save: keeps x for the weight gradient, unless the dict says {"frozen": True}
    ({"only": ("weight",)}: the bias is frozen).
    # [..., I] -> [..., O]"""
    if save is not None and not save.get("frozen"):
        save["x"] = x
    # one GEMM over every row: NumPy's matmul of a [B, T, I] array loops over B, 2-2.5x slower
    # for a batch of short rows (measured on [48, 64, 192] @ [192, 192]), and rounds the same
    y = (_rows(x) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y += bias
    return y


def linear_backward(dy, saved, weight, bias=None, *, need_dx=True):
    """y = x W^T + b:  dx = dy W;  dW = dy^T x and db = sum(dy), both summed over every leading
    axis, only when the forward kept x (W trained). A weight with its own `grads` (a LoRA
    weight, npvlm/lora.py) gives its adapters' gradients instead of dW.
    dy: [..., O] -> dx [..., I] (None if not need_dx), {"weight": [O, I], "bias": [O]}"""
    dx = (_rows(dy) @ weight).reshape(*dy.shape[:-1], weight.shape[1]) if need_dx else None
    grads = {}
    if saved is not None and "x" in saved:
        only = saved.get("only", ("weight", "bias"))
        if "weight" in only:
            x = saved["x"]
            grads.update(weight.grads(dy, x) if hasattr(weight, "grads")
                         else {"weight": _rows(dy).T @ _rows(x)})        # [O, R] @ [R, I]
        if bias is not None and "bias" in only:
            grads["bias"] = _rows(dy).sum(axis=0)
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
    if _trained(saved):
        grads = {"weight": _rows(dy * n).sum(axis=0), "bias": _rows(dy).sum(axis=0)}
    return dx, _requested(grads, saved)


def rms_norm(x, weight, eps, *, save=None):
    """Gemma RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), in fp32 (HF `GemmaRMSNorm`; the weight
    is stored as an offset from 1, so a zero weight is the identity scale).
    # [..., D] -> [..., D]"""
    xp = array_module(x)
    x32 = x.astype(_at_least_f32(x), copy=False)
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
    grads = {"weight": _rows(dy * x * r).sum(axis=0)} if _trained(saved) else {}
    return dx.astype(dy.dtype, copy=False), grads


def _at_least_f32(x):
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
    x32 = x.astype(_at_least_f32(x), copy=False)
    e = x32 - x32.max(axis=axis, keepdims=True)           # a new array: the rest is in place
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e.astype(x.dtype, copy=False)


def softmax_backward(dp, p, axis=-1):
    """p = softmax(x):  dx = p (dp - sum(dp p)) along `axis`.  dp, p: [...] -> dx [...]"""
    return p * (dp - (dp * p).sum(axis=axis, keepdims=True))


def softcap(x, cap):
    """Gemma 2 soft capping: cap * tanh(x / cap) keeps |x| < cap smoothly."""
    xp = array_module(x)
    return cap * xp.tanh(x / cap)


def softcap_backward(dy, y, cap):
    """y = cap tanh(x / cap):  dx = dy (1 - (y / cap)^2), from the output y.  [...] -> [...]"""
    return dy * (1.0 - (y / cap) ** 2)
