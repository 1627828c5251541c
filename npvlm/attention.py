"""Multi-head attention with grouped K/V heads, rotary position embeddings, and the masks.

Axis legend: B batch, T query length, S key length, Hq query heads, Hk key/value heads,
G = Hq // Hk query heads per K/V head, E head dim.
"""

from .backend import array_module
from .layers import softcap, softmax
from .trace import record


def rope_tables(positions, head_dim, theta):
    """cos and sin tables for split-half RoPE (HF `GemmaRotaryEmbedding`).

    positions: int[B, T], 1-indexed as in HF PaliGemma (first real token = 1).
    inv_freq_i = theta^(-2i/E) in fp32; angle = position * inv_freq; the E/2 angles are used
    twice (`cat(freqs, freqs)`), once for each half of the head.
    Returns cos, sin: float32[B, 1, T, E] (the 1 broadcasts over heads).
    """
    xp = array_module(positions)
    exponent = xp.arange(0, head_dim, 2, dtype=xp.int64).astype(xp.float32) / head_dim  # [E/2]
    inv_freq = (1.0 / (theta ** exponent)).astype(xp.float32)
    angles = positions.astype(xp.float32)[:, :, None] * inv_freq                    # [B, T, E/2]
    angles = xp.concatenate([angles, angles], axis=-1)[:, None]                       # [B, 1, T, E]
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+E/2}) pair by its angle: the half-split ("NeoX") layout, not
    interleaved pairs. x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1].
    x: [B, H, T, E] -> [B, H, T, E]"""
    xp = array_module(x)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask, scale, logit_cap=None, trace=None, name=None):
    """Scaled dot-product attention; query head j reads K/V head j // G (HF `repeat_kv` order),
    done by reshaping the queries, so K and V are never copied per head.

    q: [B, Hq, T, E], k, v: [B, Hk, S, E], mask: additive [B, 1, T, S] or None.
    scores = (q k^T) * scale, softcapped (Gemma 2) before the mask, softmax in fp32.
    Returns [B, T, Hq*E]. When tracing, the probabilities [B, Hq, T, S] are recorded as `name`
    (HF's eager `attn_weights`, head order included).
    """
    B, Hq, T, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    G = Hq // Hk
    qg = q.reshape(B, Hk, G * T, E)                                   # [B, Hk, G*T, E]
    scores = (qg @ k.swapaxes(-1, -2)) * scale                        # [B, Hk, G*T, S]
    if logit_cap is not None:
        scores = softcap(scores, logit_cap)
    scores = scores.reshape(B, Hk, G, T, S)
    if mask is not None:
        scores = scores + mask[:, :, None]                            # [B, 1, 1, T, S] broadcast
    probs = softmax(scores, axis=-1).reshape(B, Hk, G * T, S)
    record(trace, name, probs.reshape(B, Hq, T, S))                   # head hk*G + g, as HF's
    out = (probs @ v).reshape(B, Hq, T, E)                            # [B, Hq, T, E]
    return out.transpose(0, 2, 1, 3).reshape(B, T, Hq * E)


def additive(allowed, dtype):
    """bool[...] -> 0 where allowed, the dtype's most negative finite value elsewhere. Finite, so
    a fully masked row (a left-pad query) gives a uniform softmax instead of NaN."""
    xp = array_module(allowed)
    return xp.where(allowed, xp.zeros((), dtype), xp.asarray(xp.finfo(dtype).min, dtype))


def prefix_lm_mask(attention_mask, token_type_ids, dtype, window=None):
    """The PaliGemma prefix-LM mask for a whole sequence (big_vision `make_attn_mask`, spec §7.1).

    attention_mask: int[B, T], 1 for real tokens, 0 for padding.
    token_type_ids: int[B, T], 0 for the prefix (image, <bos>, prompt, "\\n"), 1 for the suffix
    (training targets, generated tokens).
    Query i may see key j iff both are real tokens and cumsum(type)[j] <= cumsum(type)[i]: the
    prefix is one bidirectional block; every suffix token sees the prefix and earlier suffix
    tokens (causal). Example, prefix a b c, suffix x y (1 = visible):

            a b c x y
        a   1 1 1 . .
        b   1 1 1 . .
        c   1 1 1 . .
        x   1 1 1 1 .
        y   1 1 1 1 1

    window (Gemma 2 sliding layers, transformers 5.x semantics, spec §10): a key must also lie
    within the last `window` positions of the query (j > i - window, i and j sequence indices),
    unless both are prefix tokens: (causal AND window) OR prefix block. At inference the whole
    prompt is prefix, so the window only ever hides keys from suffix/generated tokens.

    Returns an additive mask [B, 1, T, T].
    """
    xp = array_module(attention_mask)
    valid = attention_mask.astype(bool)
    group = xp.cumsum(token_type_ids * attention_mask, axis=1)                   # [B, T]
    allowed = (group[:, None, :] <= group[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    if window is not None:
        T = attention_mask.shape[1]
        idx = xp.arange(T)
        in_window = idx[None, :] > idx[:, None] - window                         # [T, T]
        prefix = token_type_ids == 0
        both_prefix = prefix[:, :, None] & prefix[:, None, :]                    # [B, T, T]
        allowed &= in_window[None] | both_prefix
    return additive(allowed[:, None], dtype)                                     # [B, 1, T, T]


def decode_mask(key_valid, dtype, window=None):
    """Mask for one new token (the last slot) that sees every real cached key and itself; with a
    sliding `window`, only keys j > i - window of its own index i = S - 1.
    key_valid: [B, S] -> additive [B, 1, 1, S]."""
    xp = array_module(key_valid)
    allowed = key_valid.astype(bool)
    if window is not None:
        S = key_valid.shape[1]
        allowed = allowed & (xp.arange(S) > S - 1 - window)[None]
    return additive(allowed[:, None, None, :], dtype)
