"""Rotary position embeddings (RoPE) and the positions they rotate by (docs/spec.md §7.3, §9).

Axes (npvlm/model/layers.py): B batch, T tokens, Hq/Hk heads, E head dim.

    positions  1-indexed, as HF PaliGemma counts them: cumsum(attention_mask), so the first real
               token of a row is 1 whatever its left padding; each decode step continues at +1
    tables     angle = position * theta^(-2i/E) for i < E/2, used twice (`cat(freqs, freqs)`)
    rotation   split-half ("NeoX") layout: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]

Follows HF `GemmaRotaryEmbedding` / `apply_rotary_pos_emb` (modeling_gemma.py).
"""

from ..backend import array_module


def prompt_positions(attention_mask):
    """RoPE positions of a left-padded prompt batch: int[B, T] -> int[B, T].

    1-indexed (HF: "Paligemma positions are 1-indexed"): the first real token of each row is 1,
    whatever its left padding; pads get 1 too (their outputs are never used)."""
    xp = array_module(attention_mask)
    return xp.where(attention_mask > 0, xp.cumsum(attention_mask, axis=1), 1)


def rope_tables(positions, head_dim, theta):
    """cos and sin tables for split-half RoPE: positions int[B, T] -> rope = (cos, sin), each
    float32[B, 1, T, E] (the 1 broadcasts over heads). inv_freq_i = theta^(-2i/E) in fp32."""
    xp = array_module(positions)
    exponent = xp.arange(0, head_dim, 2, dtype=xp.int64).astype(xp.float32) / head_dim  # [E/2]
    inv_freq = (1.0 / (theta ** exponent)).astype(xp.float32)
    angles = positions.astype(xp.float32)[:, :, None] * inv_freq                    # [B, T, E/2]
    angles = xp.concatenate([angles, angles], axis=-1)[:, None]                       # [B, 1, T, E]
    return xp.cos(angles), xp.sin(angles)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last axis (the two halves of each head)."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, rope):
    """Rotate each (x_i, x_{i+E/2}) pair by its angle: x*cos + rotate_half(x)*sin.
    x: [B, H, T, E], rope = (cos, sin) [B, 1, T, E] -> [B, H, T, E]"""
    cos, sin = rope
    half = x.shape[-1] // 2
    y = x * cos                       # + rotate_half(x) * sin, one half at a time, without
    y[..., :half] -= x[..., half:] * sin[..., :half]     # building rotate_half(x): the same sums
    y[..., half:] += x[..., :half] * sin[..., half:]
    return y


def apply_rope_backward(dy, rope):
    """y = x cos + rotate_half(x) sin is linear in x, and rotate_half^T = -rotate_half, so
    dx = dy cos - rotate_half(dy sin).  dy: [B, H, T, E] -> dx [B, H, T, E]"""
    cos, sin = rope
    return dy * cos - rotate_half(dy * sin)
