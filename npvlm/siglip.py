"""SigLIP vision encoder (So400m/14 in the real models), spec §8.

Axis legend: B batch, C channels, S image side, P patch side, N = (S/P)^2 patches,
D vision width, F MLP width, H heads, E = D/H head dim.

    pixels [B, C, S, S] -> patch embedding + learned positions -> pre-LN encoder layers
    -> post_layernorm -> [B, N, D]

Follows HF `modeling_siglip.py`; no CLS token, no pooling head (PaliGemma uses every patch).
"""

from .attention import attention
from .layers import gelu_tanh, layer_norm, linear
from .trace import record


def patchify(pixels, patch_size):
    """Cut images into non-overlapping patches, row-major over the grid, each flattened in
    (C, P, P) order to match the Conv2d kernel. [B, C, S, S] -> [B, N, C*P*P]"""
    B, C, S, _ = pixels.shape
    g = S // patch_size
    x = pixels.reshape(B, C, g, patch_size, g, patch_size)     # [B, C, gy, P, gx, P]
    x = x.transpose(0, 2, 4, 1, 3, 5)                          # [B, gy, gx, C, P, P]
    return x.reshape(B, g * g, C * patch_size * patch_size)


def patch_embed(pixels, p, cfg):
    """The stride-P convolution as one matmul, plus learned position embeddings.
    [B, C, S, S] -> [B, N, D]"""
    patches = patchify(pixels, cfg.patch_size)                 # [B, N, C*P*P]
    return linear(patches, **p["patch_embedding"]) + p["position_embedding"]


def self_attention(x, p, cfg, trace=None, name=None):
    """Bidirectional multi-head attention over the patches.  [B, N, D] -> [B, N, D]
    (tracing records the probabilities [B, H, N, N] as `name`)"""
    B, N, _ = x.shape
    H, E = cfg.num_attention_heads, cfg.head_dim

    def heads(y):                                              # [B, N, H*E] -> [B, H, N, E]
        return y.reshape(B, N, H, E).transpose(0, 2, 1, 3)
    q = heads(linear(x, **p["q_proj"]))
    k = heads(linear(x, **p["k_proj"]))
    v = heads(linear(x, **p["v_proj"]))
    return linear(attention(q, k, v, None, E ** -0.5, trace=trace, name=name), **p["out_proj"])


def mlp(x, p):
    """fc2(gelu_tanh(fc1(x))).  [B, N, D] -> [B, N, F] -> [B, N, D]"""
    return linear(gelu_tanh(linear(x, **p["fc1"])), **p["fc2"])


def encoder_layer(h, p, cfg, trace=None, name=None):
    """Pre-LN transformer block.  [B, N, D] -> [B, N, D]"""
    eps = cfg.layer_norm_eps
    h = h + self_attention(layer_norm(h, **p["layer_norm1"], eps=eps), p["self_attn"], cfg, trace, name)
    return h + mlp(layer_norm(h, **p["layer_norm2"], eps=eps), p["mlp"])


def vision_tower(pixels, p, cfg, trace=None):
    """pixels: float32[B, C, S, S] in [-1, 1] -> features float32[B, N, D]."""
    h = patch_embed(pixels, p, cfg)
    record(trace, "vision.embed", h)
    for i, layer in enumerate(p["layers"]):
        h = encoder_layer(h, layer, cfg, trace, f"vision.attn.{i:02d}")
        record(trace, f"vision.layer.{i:02d}", h)
    h = layer_norm(h, **p["post_layernorm"], eps=cfg.layer_norm_eps)
    record(trace, "vision.post_norm", h)
    return h

