"""SigLIP vision encoder (So400m/14 in the real models), docs/spec.md §8.

Axes (npvlm/model/layers.py): B batch, C channels, R image side, P patch side, N = (R/P)^2 patches,
D vision width, F MLP width, Hq heads (= Hk: plain multi-head attention), E = D/Hq head dim.

    pixels [B, C, R, R] -> patch embedding + learned positions -> pre-LN encoder layers
    -> post_layernorm -> [B, N, D]

Follows HF `modeling_siglip.py`; no CLS token, no pooling head (PaliGemma uses every patch).
"""

from .attention import attention, attention_backward, projections_backward, split_heads
from .layers import gelu_tanh, gelu_tanh_backward, layer_norm, layer_norm_backward, linear, linear_backward
from .record import attention_probs, layer_saves, record, sub, trains


def patchify(pixels, patch_size):
    """Cut images into non-overlapping patches, row-major over the grid, each flattened in
    (C, P, P) order to match the Conv2d kernel. [B, C, R, R] -> [B, N, C*P*P]"""
    B, C, R, _ = pixels.shape
    g = R // patch_size
    x = pixels.reshape(B, C, g, patch_size, g, patch_size)     # [B, C, gy, P, gx, P]
    x = x.transpose(0, 2, 4, 1, 3, 5)                          # [B, gy, gx, C, P, P]
    return x.reshape(B, g * g, C * patch_size * patch_size)


def unpatchify(patches, channels, patch_size):
    """The inverse of `patchify`: [B, N, C*P*P] -> [B, C, R, R]."""
    B, N, _ = patches.shape
    g = round(N ** 0.5)
    x = patches.reshape(B, g, g, channels, patch_size, patch_size)   # [B, gy, gx, C, P, P]
    x = x.transpose(0, 3, 1, 4, 2, 5)                                 # [B, C, gy, P, gx, P]
    return x.reshape(B, channels, g * patch_size, g * patch_size)


def patch_embed(pixels, p, cfg, *, save=None):
    """The stride-P convolution as one matmul, plus learned position embeddings.
    [B, C, R, R] -> [B, N, D]"""
    patches = patchify(pixels, cfg.patch_size)                 # [B, N, C*P*P]
    h = linear(patches, **p["patch_embedding"], save=sub(save, "patch_embedding"))
    sub(save, "position_embedding")                            # its plan: trained or frozen
    return h + p["position_embedding"]["weight"]               # [N, D] broadcast over B


def patch_embed_backward(dy, saved, p, cfg, *, need_dx=False):
    """The patch kernel's gradients as a linear layer's, the position table's summed over the
    batch; with need_dx, also the gradient of the pixels (through the kernel: dy W, unpatchified).
    dy: [B, N, D] -> d_pixels [B, C, R, R] (None without need_dx), grads"""
    d_patches, g = linear_backward(dy, saved["patch_embedding"], **p["patch_embedding"], need_dx=need_dx)
    grads = {"patch_embedding": g} if g else {}
    if trains(saved["position_embedding"], "weight"):
        grads["position_embedding"] = {"weight": dy.sum(axis=0)}
    d_pixels = None if d_patches is None else unpatchify(d_patches, cfg.num_channels, cfg.patch_size)
    return d_pixels, grads


def self_attention(x, p, cfg, *, save=None):
    """Bidirectional multi-head attention over the patches.  [B, N, D] -> [B, N, D]"""
    H = cfg.num_attention_heads
    q = split_heads(linear(x, **p["q_proj"], save=sub(save, "q_proj")), H)      # [B, Hq, N, E]
    k = split_heads(linear(x, **p["k_proj"], save=sub(save, "k_proj")), H)
    v = split_heads(linear(x, **p["v_proj"], save=sub(save, "v_proj")), H)
    out = attention(q, k, v, None, cfg, save=sub(save, "attn"))                  # [B, N, D]
    return linear(out, **p["out_proj"], save=sub(save, "out_proj"))


def self_attention_backward(dy, saved, p, cfg):
    """Back through out_proj, attention and the q/k/v projections.
    dy: [B, N, D] -> dx [B, N, D], grads by projection (the trained ones)."""
    d_out, g_out = linear_backward(dy, saved["out_proj"], **p["out_proj"])
    dq, dk, dv = attention_backward(d_out, saved["attn"], cfg)
    dx, grads = projections_backward({"q_proj": dq, "k_proj": dk, "v_proj": dv}, saved, p)
    return dx, dict(grads, out_proj=g_out) if g_out else grads


def mlp(x, p, *, save=None):
    """fc2(gelu_tanh(fc1(x))).  [B, N, D] -> [B, N, F] -> [B, N, D]"""
    a = gelu_tanh(linear(x, **p["fc1"], save=sub(save, "fc1")), save=sub(save, "gelu"))
    return linear(a, **p["fc2"], save=sub(save, "fc2"))


def mlp_backward(dy, saved, p):
    """Back through fc2, the GELU and fc1.  dy: [B, N, D] -> dx [B, N, D], grads."""
    da, g2 = linear_backward(dy, saved["fc2"], **p["fc2"])
    dx, g1 = linear_backward(gelu_tanh_backward(da, saved["gelu"]), saved["fc1"], **p["fc1"])
    return dx, {k: g for k, g in (("fc1", g1), ("fc2", g2)) if g}


def encoder_layer(h, p, cfg, *, save=None):
    """Pre-LN transformer layer.  [B, N, D] -> [B, N, D]"""
    eps = cfg.layer_norm_eps
    x = layer_norm(h, **p["layer_norm1"], eps=eps, save=sub(save, "layer_norm1"))
    h = h + self_attention(x, p["self_attn"], cfg, save=sub(save, "self_attn"))
    x = layer_norm(h, **p["layer_norm2"], eps=eps, save=sub(save, "layer_norm2"))
    return h + mlp(x, p["mlp"], save=sub(save, "mlp"))


def encoder_layer_backward(dh, saved, p, cfg):
    """Back through `encoder_layer`'s two residual branches.  dh: [B, N, D] -> [B, N, D], grads."""
    grads = {}
    dx, grads["mlp"] = mlp_backward(dh, saved["mlp"], p["mlp"])
    dx, grads["layer_norm2"] = layer_norm_backward(dx, saved["layer_norm2"], **p["layer_norm2"])
    dh = dh + dx
    dx, grads["self_attn"] = self_attention_backward(dh, saved["self_attn"], p["self_attn"], cfg)
    dx, grads["layer_norm1"] = layer_norm_backward(dx, saved["layer_norm1"], **p["layer_norm1"])
    return dh + dx, {k: g for k, g in grads.items() if g}


def vision_tower(pixels, p, cfg, *, trace=None, save=None):
    """pixels: float32[B, C, R, R] in [-1, 1] -> features float32[B, N, D].
    trace: stage outputs by name (vision.embed, vision.layer.NN, vision.attn.NN, vision.post_norm)."""
    h = patch_embed(pixels, p, cfg, save=save)
    record(trace, "vision.embed", h)
    for i, (layer, s) in enumerate(zip(p["layers"], layer_saves(save, trace, len(p["layers"])))):
        h = encoder_layer(h, layer, cfg, save=s)
        record(trace, f"vision.layer.{i:02d}", h)
        record(trace, f"vision.attn.{i:02d}", attention_probs(s))
    h = layer_norm(h, **p["post_layernorm"], eps=cfg.layer_norm_eps, save=sub(save, "post_layernorm"))
    record(trace, "vision.post_norm", h)
    return h


def vision_tower_backward(dy, saved, p, cfg, *, need_dx=False, trace=None):
    """Back through the whole tower, last layer first. dy: [B, N, D] (gradient of the features)
    -> d_pixels [B, C, R, R] (None without need_dx), grads mirroring `p` (the trained tensors
    only). trace: the gradient arriving at each stage's output, by the forward's stage names with
    "grad." in front."""
    record(trace, "grad.vision.post_norm", dy)
    dh, g_post = layer_norm_backward(dy, saved["post_layernorm"], **p["post_layernorm"])
    layer_grads = [None] * len(p["layers"])
    for i in reversed(range(len(p["layers"]))):
        record(trace, f"grad.vision.layer.{i:02d}", dh)
        dh, layer_grads[i] = encoder_layer_backward(dh, saved["layers"][i], p["layers"][i], cfg)
    record(trace, "grad.vision.embed", dh)
    d_pixels, grads = patch_embed_backward(dh, saved, p, cfg, need_dx=need_dx)
    if g_post:
        grads["post_layernorm"] = g_post
    if any(layer_grads):
        grads["layers"] = layer_grads
    return d_pixels, grads
