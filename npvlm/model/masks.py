"""Attention masks: the PaliGemma prefix-LM mask, Gemma 2's sliding window, and decode steps
(docs/spec.md §7, §10). Every mask is additive: 0 where a key is visible, the dtype's most
negative finite value where it is not.

Axes (npvlm/model/layers.py): B batch, T queries, S keys.
"""

from ..backend import array_module


def additive(allowed, dtype):
    """bool[...] -> 0 where allowed, the dtype's most negative finite value elsewhere. Finite, so
    a fully masked row (a left-pad query) gives a uniform softmax instead of NaN."""
    xp = array_module(allowed)
    return xp.where(allowed, xp.zeros((), dtype), xp.asarray(xp.finfo(dtype).min, dtype))


def prefix_lm_mask(attention_mask, token_type_ids, dtype, window=None):
    """The PaliGemma prefix-LM mask for a whole sequence (big_vision `make_attn_mask`, docs/spec.md §7.1).

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

    window (Gemma 2 sliding layers, transformers 5.x semantics, docs/spec.md §10): a key must also
    lie within the last `window` positions of the query (j > i - window, i and j sequence
    indices), unless both are prefix tokens: (causal AND window) OR prefix block. At inference the
    whole prompt is prefix, so the window only ever hides keys from suffix/generated tokens.

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


def prefill_masks(attention_mask, token_type_ids, text_cfg, dtype):
    """The masks of a whole-sequence pass by layer type, as the decoder picks them per layer:
    "full_attention" (the prefix-LM mask) and, for Gemma 2, "sliding_attention" (the same mask
    limited to the last `sliding_window` keys). Each [B, 1, T, T]."""
    masks = {"full_attention": prefix_lm_mask(attention_mask, token_type_ids, dtype)}
    if text_cfg.sliding_window is not None:
        masks["sliding_attention"] = prefix_lm_mask(attention_mask, token_type_ids, dtype,
                                                    text_cfg.sliding_window)
    return masks


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


def decode_step_masks(key_valid, text_cfg, dtype):
    """`decode_mask` by layer type, as `prefill_masks`. key_valid [B, S] -> each [B, 1, 1, S]."""
    masks = {"full_attention": decode_mask(key_valid, dtype)}
    if text_cfg.sliding_window is not None:
        masks["sliding_attention"] = decode_mask(key_valid, dtype, text_cfg.sliding_window)
    return masks

