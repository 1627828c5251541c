"""PaliGemma: SigLIP image tokens + text tokens -> Gemma -> next-token logits.

Axes (npvlm/model/layers.py): B batch, C channels, R image side, N image tokens, T sequence length,
D text width, V vocab.

    pixels [B, C, R, R] --SigLIP--> [B, N, D_v] --projector--> [B, N, D]
    input_ids [B, T] = <image>*N <bos> prompt "\\n"  (left-padded in a batch)
    embeddings [B, T, D]: image features at the <image> positions, sqrt(D)-scaled text elsewhere
    Gemma / Gemma 2 decoder with the prefix-LM mask (and Gemma 2 sliding window) and 1-indexed
    positions cumsum(attention_mask)
    logits [B, V] at each row's last real token (prefill), then one token at a time (decode).

Two phases, as in every LLM runtime: `prefill` runs the whole prompt at once (matmuls over T
tokens; this is where the time goes for short answers) and fills the KV cache; `decode_step`
runs one token per row against the cache (matrix-vector work, bound by memory bandwidth).

A `batch` is the processor's dict: input_ids and attention_mask int[B, T], optional
token_type_ids int[B, T] (0 prefix, 1 suffix; None = all prefix) and pixel_values
float32[B, C, R, R] (or `image_tokens` [B, N, D] already encoded), all on the model's backend.

The module reads top-down: inference (encode_images, merge_embeddings, decoder_inputs, decoder,
prefill, decode_step), then training (forward_loss, backward, and the backward functions it
calls, in the order it calls them).
"""

from ..backend import array_module, to_host
from .gemma import LAYER_BACKWARDS, LAYERS, embed_tokens, embed_tokens_backward, key_values, lm_head, lm_head_backward
from .kv_cache import KVCache, LayerKV
from .layers import linear, linear_backward, rms_norm, rms_norm_backward, rows
from .loss import cross_entropy, cross_entropy_backward, loss_positions, token_weights
from .masks import decode_step_masks, prefill_masks
from .record import attention_probs, layer_saves, record, sub, trains
from .rope import prompt_positions, rope_tables
from .siglip import vision_tower, vision_tower_backward

# ---- inference ----------------------------------------------------------------------------------


def encode_images(pixel_values, params, cfg, *, trace=None, save=None):
    """pixel_values: float32[B, C, R, R] in [-1, 1] -> image tokens float32[B, N, D].
    The projector output is used as is: HF v4's divide-by-sqrt(D) is undone by its later
    multiply (docs/spec.md §6), so image tokens are effectively unscaled, as in HF 5.x and
    big_vision."""
    features = vision_tower(pixel_values, params["vision"], cfg.vision, trace=trace, save=sub(save, "vision"))
    image_tokens = linear(features, **params["projector"], save=sub(save, "projector"))
    record(trace, "projector", image_tokens)
    return image_tokens


def image_positions(input_ids, cfg):
    """bool[B, T]: where the <image> tokens are (the image features go there)."""
    return input_ids == cfg.image_token_index


def merge_embeddings(input_ids, image_tokens, p, cfg, *, save=None):
    """Token embeddings x sqrt(D), with the image tokens written, in order, over the <image>
    positions (HF `masked_scatter`: image b fills the <image> run of row b). Without image
    tokens (decode steps) every id is embedded as a token, as HF does when a model happens to
    generate the <image> id. p = params["text"]["embed_tokens"].
    input_ids: int[B, T], image_tokens: [B, N, D] or None -> [B, T, D].
    save: keeps the ids looked up, where the image tokens went and their shape."""
    xp = array_module(input_ids)
    is_image = image_positions(input_ids, cfg)
    ids = input_ids
    if cfg.image_token_index >= cfg.text.vocab_size:   # small configs: HF maps <image> to 0 too
        ids = xp.where(is_image, 0, input_ids)
    h = embed_tokens(ids, p, cfg.text, save=save)
    if image_tokens is None:
        return h
    h[is_image] = rows(image_tokens).astype(h.dtype, copy=False)   # N per image: checked by the API
    if save is not None:
        save.update(is_image=is_image, image_shape=image_tokens.shape)
    return h


def decoder_inputs(batch, image_tokens, params, cfg, *, trace=None, save=None):
    """What the decoder takes for a whole sequence (a prefill, a training pass): the merged
    embeddings h [B, T, D]; rope = (cos, sin) at the 1-indexed positions cumsum(attention_mask);
    and the prefix-LM masks by layer type (token_type_ids None: all prefix).
    save: the embedding's dict (merge_embeddings)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    token_type_ids = batch.get("token_type_ids")
    if token_type_ids is None:
        token_type_ids = array_module(input_ids).zeros_like(input_ids)
    h = merge_embeddings(input_ids, image_tokens, params["text"]["embed_tokens"], cfg, save=save)
    record(trace, "text.embed", h)
    rope = rope_tables(prompt_positions(attention_mask), cfg.text.head_dim, cfg.text.rope_theta)
    masks = prefill_masks(attention_mask, token_type_ids, cfg.text, h.dtype)
    return h, rope, masks


def decoder(h, layers, cfg, rope, masks, cache=None, *, trace=None, save=None):
    """Run Gemma layers in order. h: [B, T, D] -> [B, T, D]; rope = (cos, sin) for the T
    positions; masks by layer type (`masks.prefill_masks`), chosen per layer (Gemma 2 slides
    on some); `cache`: the KV cache whose layer i slot layer i writes."""
    layer_fn = LAYERS[cfg.model_type]
    for i, (layer, s) in enumerate(zip(layers, layer_saves(save, trace, len(layers)))):
        kv = cache.layers[i] if cache is not None else None
        h = layer_fn(h, layer, cfg, rope, masks[cfg.layer_type(i)], kv, save=s)
        record(trace, f"text.layer.{i:02d}", h)
        record(trace, f"text.attn.{i:02d}", attention_probs(s))
    return h


def final_layer_last_token(h, p, cfg, rope, mask, kv):
    """The final decoder layer of a prefill that only needs the next token: it writes its keys
    and values for positions 1..T-1 to the cache slot `kv` (the next decode steps need them),
    then runs as a decode step for the last position alone against them. The queries, attention
    output and MLP of the other T-1 positions are never computed: 1/L of the prefill.
    h: [B, T, D] -> [B, 1, D]; rope, mask: the full pass's, [.., T, ..]."""
    B, T, _ = h.shape
    if kv is None:                                  # no cache: a scratch slot for this layer
        xp = array_module(h)
        shape = (B, cfg.num_key_value_heads, T, cfg.head_dim)
        kv = LayerKV(xp.zeros(shape, xp.float32), xp.zeros(shape, xp.float32))
    cos, sin = rope
    # keys and values of all T rows, the last one dropped: the same matmul shapes as the full
    # layer's, so the same rounding (BLAS may block a product of T - 1 rows differently)
    x = rms_norm(h, **p["input_layernorm"], eps=cfg.rms_norm_eps)
    k, v = key_values(x, p["self_attn"], cfg, rope)
    kv.write(k[:, :, :-1], v[:, :, :-1])
    return LAYERS[cfg.model_type](h[:, -1:], p, cfg, (cos[:, :, -1:], sin[:, :, -1:]), mask[..., -1:, :], kv)


def final_norm(h, p, cfg, *, save=None):
    """The decoder's last RMSNorm, p = params["text"]["norm"].  [..., D] -> [..., D]"""
    return rms_norm(h, **p, eps=cfg.rms_norm_eps, save=save)


def prefill(batch, params, cfg, *, cache=None, logits_for="last", trace=None):
    """Run a whole (left-padded) prompt batch; fill `cache` if given.

    logits_for="last": logits [B, V] at each row's last real token only (the vocabulary
    projection is the largest matmul; it is never run for every prompt position).
    logits_for="all": logits [B, T, V] (parity tests, scoring).
    trace: every stage output by name (npvlm/model/record.py)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    xp = array_module(input_ids)
    image_tokens = batch.get("image_tokens")
    if batch.get("pixel_values") is not None:
        image_tokens = encode_images(batch["pixel_values"], params, cfg, trace=trace)
    if cache is not None and cache.length:
        raise ValueError("prefill needs an empty cache")
    text = params["text"]
    h, rope, masks = decoder_inputs(batch, image_tokens, params, cfg, trace=trace)
    # Rows are left-padded, so every row's last real token is at T-1, and when only the next
    # token is wanted the final layer can run for that position alone. Not when tracing: the
    # traced stages are compared whole with HF's.
    last_only = logits_for == "last" and trace is None and bool((attention_mask[:, -1] > 0).all())
    layers = text["layers"]
    if last_only:
        h = decoder(h, layers[:-1], cfg.text, rope, masks, cache)
        final = len(layers) - 1
        kv = cache.layers[final] if cache is not None else None
        h = final_layer_last_token(h, layers[final], cfg.text, rope, masks[cfg.text.layer_type(final)], kv)
    else:
        h = decoder(h, layers, cfg.text, rope, masks, cache, trace=trace)
    if cache is not None:
        cache.advance(attention_mask.astype(xp.int32))
    if logits_for == "last":
        T = input_ids.shape[1]
        last = (attention_mask * xp.arange(T)).argmax(axis=1)          # last real token per row
        h = h[:, -1] if last_only else h[xp.arange(h.shape[0]), last]  # [B, D]
    h = final_norm(h, text["norm"], cfg.text)
    record(trace, "text.final_norm", h)
    logits = lm_head(h, text["embed_tokens"], cfg.text)
    record(trace, "logits", logits)
    return logits


def decode_step(token_ids, cache, params, cfg, *, trace=None):
    """One new token per row against the cache. token_ids: int[B] -> logits [B, V]."""
    xp = array_module(token_ids)
    B = token_ids.shape[0]
    text = params["text"]
    h = merge_embeddings(token_ids[:, None], None, text["embed_tokens"], cfg)        # [B, 1, D]
    rope = rope_tables(cache.next_position[:, None], cfg.text.head_dim, cfg.text.rope_theta)
    key_valid = cache.key_valid[:, :cache.length + 1].copy()
    key_valid[:, -1] = 1                                                           # itself
    h = decoder(h, text["layers"], cfg.text, rope, decode_step_masks(key_valid, cfg.text, h.dtype),
                cache, trace=trace)
    cache.advance(xp.ones((B, 1), xp.int32))
    logits = lm_head(final_norm(h[:, 0], text["norm"], cfg.text), text["embed_tokens"], cfg.text)
    record(trace, "logits", logits)
    return logits


def new_cache(cfg, batch, capacity, like):
    """An empty KV cache for `batch` rows of up to `capacity` tokens, on the backend of `like`."""
    return KVCache.allocate(cfg.text, batch, capacity, like)


# ---- training: the loss, and the backward pass ---------------------------------------------------


def forward_loss(batch, params, cfg, reduction="example", *, save=None, trace=None):
    """The training loss of a batch: the whole sequence in one pass under the prefix-LM mask
    (bidirectional over image + prefix, causal over the suffix), next-token cross-entropy at the
    positions whose next label is not -100 (npvlm/model/loss.py), reduced per `reduction`.

    batch: the processor's training dict (input_ids, attention_mask, token_type_ids, labels
    int[B, T]; pixel_values float32[B, C, R, R]) on the model's backend.
    save: the root dict of a training pass, from a save plan (npvlm/training/grads.py); `backward`
    reads it. trace: the forward's stage outputs, and "logits" [n, V] at the loss positions.
    Returns the loss, a 0-d array."""
    xp = array_module(batch["input_ids"])
    rows, cols, targets = loss_positions(to_host(batch["labels"]))                  # host
    weights = token_weights(rows, batch["input_ids"].shape[0], reduction)
    image_tokens = encode_images(batch["pixel_values"], params, cfg, trace=trace, save=save)
    text, st = params["text"], sub(save, "text")
    h, rope, masks = decoder_inputs(batch, image_tokens, params, cfg, trace=trace, save=sub(st, "embed_tokens"))
    h = decoder(h, text["layers"], cfg.text, rope, masks, trace=trace, save=st)
    h = final_norm(h, text["norm"], cfg.text, save=sub(st, "norm"))
    record(trace, "text.final_norm", h)
    rows, cols = xp.asarray(rows), xp.asarray(cols)
    logits = lm_head(h[rows, cols], text["embed_tokens"], cfg.text, save=sub(st, "lm_head"))  # [n, V]
    record(trace, "logits", logits)
    loss = cross_entropy(logits, xp.asarray(targets), xp.asarray(weights, dtype=logits.dtype),
                         save=sub(save, "loss"))
    if save is not None:
        save["inputs"] = {"rope": rope, "rows": rows, "cols": cols, "shape": h.shape}
    return loss


def backward(saved, params, cfg, *, trace=None):
    """The gradient of `forward_loss`'s loss for every trained parameter (those its save plan
    did not mark frozen), from the loss back to the pixels' first layer; nothing runs into the
    vision tower when it and the projector are frozen. Returns grads mirroring `params`, with
    the trained tensors only. trace: "grad." + stage name = the gradient arriving at that
    stage's output (grad.logits, grad.text.final_norm, grad.text.layer.NN, grad.text.embed,
    grad.projector, grad.vision.post_norm, grad.vision.layer.NN, grad.vision.embed)."""
    text, st, inputs = params["text"], saved["text"], saved["inputs"]
    d_logits = cross_entropy_backward(1.0, saved["loss"])
    record(trace, "grad.logits", d_logits)
    d_rows, g_head = lm_head_backward(d_logits, st["lm_head"], text["embed_tokens"], cfg.text)
    xp = array_module(d_rows)
    dh = xp.zeros(inputs["shape"], dtype=d_rows.dtype)
    dh[inputs["rows"], inputs["cols"]] = d_rows                       # one loss per position
    record(trace, "grad.text.final_norm", dh)
    dh, g_norm = rms_norm_backward(dh, st["norm"], **text["norm"])
    dh, g_layers = decoder_backward(dh, st, text["layers"], cfg.text, inputs["rope"], trace=trace)
    record(trace, "grad.text.embed", dh)
    d_image, g_lookup = merge_embeddings_backward(dh, st["embed_tokens"], text["embed_tokens"], cfg)
    g_text = {"layers": g_layers} if any(g_layers) else {}
    if g_norm:
        g_text["norm"] = g_norm
    if g_head:                                   # tied: the lookup's share plus the head's
        g_text["embed_tokens"] = {"weight": g_head["weight"] + g_lookup["weight"]}
    _, grads = encode_images_backward(d_image, saved, params, cfg, trace=trace)
    if g_text:
        grads["text"] = g_text
    return grads


def decoder_backward(dh, saved, layers, cfg, rope, *, trace=None):
    """Back through the Gemma layers, last first. dh: [B, T, D] (gradient of the last layer's
    output) -> dh of the first layer's input, [per-layer grads]. trace: grad.text.layer.NN, the
    gradient arriving at each layer's output."""
    layer_backward = LAYER_BACKWARDS[cfg.model_type]
    grads = [None] * len(layers)
    for i in reversed(range(len(layers))):
        record(trace, f"grad.text.layer.{i:02d}", dh)
        dh, grads[i] = layer_backward(dh, saved["layers"][i], layers[i], cfg, rope)
    return dh, grads


def merge_embeddings_backward(dy, saved, p, cfg):
    """Split the gradient of the merged embeddings: the <image> positions go to the image tokens,
    the others to the embedding rows of their ids (when the embedding trains).
    dy: [B, T, D] -> d_image_tokens [B, N, D], {"weight": [V, D]} or {}"""
    is_image = saved["is_image"]
    d_image = dy[is_image].reshape(saved["image_shape"])
    if not trains(saved, "weight"):
        return d_image, {}
    text_only = array_module(dy).where(is_image[..., None], 0, dy)      # image rows are not lookups
    _, grads = embed_tokens_backward(text_only, saved, p, cfg.text)
    return d_image, grads


def encode_images_backward(dy, saved, params, cfg, *, need_dx=False, trace=None):
    """Back through the projector and the vision tower, as far as something trains (a subtree
    planned None is never entered). dy: [B, N, D] (gradient of the image tokens) -> d_pixels
    [B, C, R, R] (None without need_dx), grads {"projector": ..., "vision": ...} (the trained).
    saved: the root save dict, as `encode_images` filled it."""
    grads, d_pixels = {}, None
    if saved.get("projector") is None:           # nothing in the projector or the vision trains
        return d_pixels, grads
    record(trace, "grad.projector", dy)
    vision = saved.get("vision")
    d_features, g_proj = linear_backward(dy, saved["projector"], **params["projector"],
                                         need_dx=vision is not None)
    if g_proj:
        grads["projector"] = g_proj
    if vision is not None:
        d_pixels, g_vision = vision_tower_backward(d_features, vision, params["vision"], cfg.vision,
                                                   need_dx=need_dx, trace=trace)
        if g_vision:
            grads["vision"] = g_vision
    return d_pixels, grads
