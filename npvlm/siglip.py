"""SigLIP vision encoder (So400m/14 in the real models), docs/spec.md §8.

Axes (npvlm/layers.py): B batch, C channels, R image side, P patch side, N = (R/P)^2 patches,
D vision width, F MLP width, Hq heads (= Hk: plain multi-head attention), E = D/Hq head dim.

    pixels [B, C, R, R] -> patch embedding + learned positions -> pre-LN encoder layers
    -> post_layernorm -> [B, N, D]

Follows HF `modeling_siglip.py`; no CLS token, no pooling head (PaliGemma uses every patch).
"""

from .attention import attention
from .layers import gelu_tanh, layer_norm, linear, sub
from .trace import layer_saves, record


def patchify(pixels, patch_size):
    """Cut images into non-overlapping patches, row-major over the grid, each flattened in
    (C, P, P) order to match the Conv2d kernel. [B, C, R, R] -> [B, N, C*P*P]"""
    B, C, R, _ = pixels.shape
    g = R // patch_size
    x = pixels.reshape(B, C, g, patch_size, g, patch_size)     # [B, C, gy, P, gx, P]
    x = x.transpose(0, 2, 4, 1, 3, 5)                          # [B, gy, gx, C, P, P]
    return x.reshape(B, g * g, C * patch_size * patch_size)


def patch_embed(pixels, p, cfg, *, save=None):
    """The stride-P convolution as one matmul, plus learned position embeddings.
    [B, C, R, R] -> [B, N, D]"""
    patches = patchify(pixels, cfg.patch_size)                 # [B, N, C*P*P]
    return linear(patches, **p["patch_embedding"], save=sub(save, "patch_embedding")) + p["position_embedding"]


def split_heads(y, n_heads):
    """[B, T, H*E] -> [B, H, T, E]"""
    B, T, _ = y.shape
    return y.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3)


def self_attention(x, p, cfg, *, save=None):
    """Bidirectional multi-head attention over the patches.  [B, N, D] -> [B, N, D]"""
    H = cfg.num_attention_heads
    q = split_heads(linear(x, **p["q_proj"], save=sub(save, "q_proj")), H)      # [B, Hq, N, E]
    k = split_heads(linear(x, **p["k_proj"], save=sub(save, "k_proj")), H)
    v = split_heads(linear(x, **p["v_proj"], save=sub(save, "v_proj")), H)
    out = attention(q, k, v, None, cfg, save=sub(save, "attn"))                  # [B, N, D]
    return linear(out, **p["out_proj"], save=sub(save, "out_proj"))


def mlp(x, p, *, save=None):
    """fc2(gelu_tanh(fc1(x))).  [B, N, D] -> [B, N, F] -> [B, N, D]"""
    a = gelu_tanh(linear(x, **p["fc1"], save=sub(save, "fc1")), save=sub(save, "gelu"))
    return linear(a, **p["fc2"], save=sub(save, "fc2"))


def encoder_layer(h, p, cfg, *, save=None):
    """Pre-LN transformer block.  [B, N, D] -> [B, N, D]"""
    eps = cfg.layer_norm_eps
    x = layer_norm(h, **p["layer_norm1"], eps=eps, save=sub(save, "layer_norm1"))
    h = h + self_attention(x, p["self_attn"], cfg, save=sub(save, "self_attn"))
    x = layer_norm(h, **p["layer_norm2"], eps=eps, save=sub(save, "layer_norm2"))
    return h + mlp(x, p["mlp"], save=sub(save, "mlp"))


def vision_tower(pixels, p, cfg, *, trace=None, save=None):
    """pixels: float32[B, C, R, R] in [-1, 1] -> features float32[B, N, D].
    trace: stage outputs by name (vision.embed, vision.layer.NN, vision.attn.NN, vision.post_norm)."""
    h = patch_embed(pixels, p, cfg, save=sub(save, "embed"))
    record(trace, "vision.embed", h)
    for i, (layer, s) in enumerate(zip(p["layers"], layer_saves(save, trace, len(p["layers"])))):
        h = encoder_layer(h, layer, cfg, save=s)
        record(trace, f"vision.layer.{i:02d}", h)
        record(trace, f"vision.attn.{i:02d}", s and s["self_attn"]["attn"]["probs"])
    h = layer_norm(h, **p["post_layernorm"], eps=cfg.layer_norm_eps, save=sub(save, "post_layernorm"))
    record(trace, "vision.post_norm", h)
    return h
