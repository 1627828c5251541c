"""PaliGemma: SigLIP image tokens + text tokens -> Gemma -> next-token logits.

Axis legend: B batch, C channels, S image side, N image tokens, T sequence length, D text width,
V vocab.

    pixels [B, C, S, S] --SigLIP--> [B, N, D_v] --projector--> [B, N, D]
    input_ids [B, T] = <image>*N <bos> prompt "\\n"  (left-padded in a batch)
    embeddings [B, T, D]: image features at the <image> positions, sqrt(D)-scaled text elsewhere
    Gemma / Gemma 2 decoder with the prefix-LM mask (and Gemma 2 sliding window) and 1-indexed
    positions cumsum(attention_mask)
    logits [B, V] at each row's last real token (prefill), then one token at a time (decode).

Two phases, as in every LLM runtime: `prefill` runs the whole prompt at once (matmuls over T
tokens; this is where the time goes for short answers) and fills the KV cache; `decode_step`
runs one token per row against the cache (matrix-vector work, bound by memory bandwidth).
"""

from .attention import decode_mask, prefix_lm_mask, rope_tables
from .backend import array_module
from .errors import InputError
from .gemma import BLOCKS, embed_tokens, lm_head
from .kv_cache import KVCache
from .layers import linear
from .siglip import vision_tower
from .trace import record


def encode_images(params, cfg, pixel_values, trace=None):
    """pixel_values: float32[B, C, S, S] in [-1, 1] -> image tokens float32[B, N, D].
    The projector output is used as is: HF v4's divide-by-sqrt(D) is undone by its later
    multiply (spec §6), so image tokens are effectively unscaled, as in HF 5.x and big_vision."""
    v = cfg.vision
    expected = (v.num_channels, v.image_size, v.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(f"pixel_values must be [B, {', '.join(map(str, expected))}], "
                         f"got {list(pixel_values.shape)}")
    features = vision_tower(pixel_values, params["vision"], v, trace)
    image_tokens = linear(features, **params["projector"])
    record(trace, "projector", image_tokens)
    return image_tokens


def merge_embeddings(params, cfg, input_ids, image_tokens):
    """Token embeddings x sqrt(D), with the image tokens written, in order, over the <image>
    positions (HF `masked_scatter`: image b fills the <image> run of row b). Without image
    tokens (decode steps) every id is embedded as a token, as HF does when a model happens to
    generate the <image> id.
    input_ids: int[B, T], image_tokens: [B, N, D] or None -> [B, T, D]"""
    xp = array_module(params["text"]["embed_tokens"]["weight"])
    is_image = input_ids == cfg.image_token_index
    ids = input_ids
    if cfg.image_token_index >= cfg.text.vocab_size:   # small configs: HF maps <image> to 0 too
        ids = xp.where(is_image, 0, input_ids)
    h = embed_tokens(ids, params["text"]["embed_tokens"]["weight"], cfg.text)
    if image_tokens is None:
        return h
    n_image = int(is_image.sum())
    n_features = image_tokens.shape[0] * image_tokens.shape[1]
    if n_image != n_features:
        raise InputError(f"the prompt has {n_image} <image> tokens but there are {n_features} image "
                         f"features ({cfg.num_image_tokens} per image); each row needs exactly one "
                         "image's worth of <image> tokens")
    h[is_image] = image_tokens.reshape(-1, image_tokens.shape[-1]).astype(h.dtype, copy=False)
    return h


def decoder(h, params, cfg, positions, masks, cache, trace=None, last_only=False):
    """Run every Gemma layer. h: [B, T, D], positions: int[B, T] -> [B, T, D].
    masks: {"full_attention": ..., "sliding_attention": ...}, chosen per layer (Gemma 2).
    last_only: only the last position's output is needed (-> [B, 1, D]); the final layer then
    skips the queries, attention output and MLP of the other positions (1/L of the prefill)."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    block = BLOCKS[cfg.model_type]
    record(trace, "text.embed", h)
    n_layers = len(params["layers"])
    for i, layer in enumerate(params["layers"]):
        h = block(h, layer, cfg, cos, sin, masks[cfg.layer_type(i)], cache, i,
                  last_only=last_only and i == n_layers - 1, trace=trace)
        record(trace, f"text.layer.{i:02d}", h)
    return h


def check_token_ids(input_ids, cfg):
    """Validate ids on the host side of the contract: CuPy gathers wrap out-of-range ids."""
    xp = array_module(input_ids)
    bad = (input_ids < 0) | ((input_ids >= cfg.text.vocab_size) & (input_ids != cfg.image_token_index))
    if bool(bad.any()):
        raise InputError(f"token ids must lie in [0, {cfg.text.vocab_size}) (or be the <image> id "
                         f"{cfg.image_token_index}); got min {int(input_ids.min())}, max {int(input_ids.max())}")
    return xp


def prompt_positions(attention_mask):
    """RoPE positions of a left-padded prompt batch: int[B, T] -> int[B, T].

    1-indexed (HF: "Paligemma positions are 1-indexed"): the first real token of each row is 1,
    whatever its left padding; pads get 1 too (their outputs are never used)."""
    xp = array_module(attention_mask)
    return xp.where(attention_mask > 0, xp.cumsum(attention_mask, axis=1), 1)


def prefill_masks(attention_mask, token_type_ids, text_cfg, dtype):
    """The additive prefill masks [B, 1, T, T] by layer type, as `decoder` takes them:
    "full_attention" (the prefix-LM mask) and, for Gemma 2, "sliding_attention" (the same mask
    limited to the last `sliding_window` keys)."""
    masks = {"full_attention": prefix_lm_mask(attention_mask, token_type_ids, dtype)}
    if text_cfg.sliding_window is not None:
        masks["sliding_attention"] = prefix_lm_mask(attention_mask, token_type_ids, dtype,
                                                    text_cfg.sliding_window)
    return masks


def prefill(params, cfg, input_ids, attention_mask, pixel_values=None, token_type_ids=None,
            cache=None, logits_for="last", trace=None, image_tokens=None):
    """Run a whole (left-padded) prompt batch; fill `cache` if given.

    input_ids, attention_mask: int[B, T]; token_type_ids: int[B, T] or None (= all prefix);
    pixel_values: float32[B, C, S, S], or image_tokens: [B, N, D] already encoded, or neither.
    logits_for="last": logits [B, V] at each row's last real token only (the vocabulary
    projection is the largest matmul; it is never run for every prompt position).
    logits_for="all": logits [B, T, V] (parity tests, scoring).
    """
    xp = check_token_ids(input_ids, cfg)
    if token_type_ids is None:
        token_type_ids = xp.zeros_like(input_ids)
    if pixel_values is not None:
        image_tokens = encode_images(params, cfg, pixel_values, trace)
    h = merge_embeddings(params, cfg, input_ids, image_tokens)
    positions = prompt_positions(attention_mask)
    masks = prefill_masks(attention_mask, token_type_ids, cfg.text, h.dtype)
    if cache is not None and cache.length:
        raise ValueError("prefill needs an empty cache")
    # Rows are left-padded, so every row's last real token is at T-1, and when only the next
    # token is wanted the final layer needs to run for that position alone. (Not when tracing:
    # the traced stages are compared whole with HF's.)
    last_only = logits_for == "last" and trace is None and bool((attention_mask[:, -1] > 0).all())
    h = decoder(h, params["text"], cfg.text, positions, masks, cache, trace, last_only)
    if cache is not None:
        cache.advance(attention_mask.astype(xp.int32))
    if last_only:
        h = h[:, -1]                                                   # [B, D]
    elif logits_for == "last":
        T = input_ids.shape[1]
        last = (attention_mask * xp.arange(T)).argmax(axis=1)          # last real token per row
        h = h[xp.arange(h.shape[0]), last]                             # [B, D]
    h, logits = lm_head(h, params["text"], cfg.text)
    record(trace, "text.final_norm", h)
    record(trace, "logits", logits)
    return logits


def decode_step(params, cfg, token_ids, cache, trace=None):
    """One new token per row against the cache. token_ids: int[B] -> logits [B, V]."""
    xp = check_token_ids(token_ids, cfg)
    B = token_ids.shape[0]
    h = merge_embeddings(params, cfg, token_ids[:, None], None)                     # [B, 1, D]
    positions = cache.next_position[:, None]                                       # [B, 1]
    key_valid = cache.key_valid[:, :cache.length + 1].copy()
    key_valid[:, -1] = 1                                                           # itself
    masks = {"full_attention": decode_mask(key_valid, h.dtype)}                    # [B, 1, 1, S]
    if cfg.text.sliding_window is not None:
        masks["sliding_attention"] = decode_mask(key_valid, h.dtype, cfg.text.sliding_window)
    h = decoder(h, params["text"], cfg.text, positions, masks, cache, trace)
    cache.advance(xp.ones((B, 1), xp.int32))
    h, logits = lm_head(h[:, 0], params["text"], cfg.text)
    record(trace, "logits", logits)
    return logits


def new_cache(cfg, batch, capacity, like):
    return KVCache.allocate(cfg.text, batch, capacity, like)
