"""Token-level generation: prefill once, then one cached decode step per new token.

    prefill:  the whole prompt batch [B, T] in one pass -> KV cache filled, logits [B, V]
    decode:   for t = 1 .. max_new_tokens-1: choose a token per row, run it alone [B, 1]
              against the cache (its mask: every real cached key; positions continue per row)

Only the chosen token ids cross from the device to the host each step.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from .backend import synchronize
from .errors import InputError
from .sampling import SamplingOptions, choose


@dataclass
class TokenGeneration:
    """tokens: int64[B, n] (rows that stopped early are padded with pad_token_id after their
    last token); lengths: int[B] generated tokens per row (the stop token included);
    finish: per row "eos", "stop" or "length"; timings in seconds."""
    tokens: np.ndarray
    lengths: np.ndarray
    finish: list
    timings: dict = field(default_factory=dict)


def check_generation_args(cfg, prompt_len, max_new_tokens):
    """One-line errors for a bad max_new_tokens or a prompt that does not fit the positions."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = cfg.text.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise InputError(f"prompt ({prompt_len} tokens, {cfg.num_image_tokens} of them image tokens) "
                         f"+ max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} exceeds "
                         f"the model's {limit} positions; shorten the prompt or lower max_new_tokens")


def generate_ids(model, input_ids, attention_mask, pixel_values=None, max_new_tokens=32,
                 options=SamplingOptions(), stop_ids=None, on_step=None):
    """Generate up to `max_new_tokens` per row of a left-padded batch.

    stop_ids: token ids that end a row (the eos id, normally); the stop token is kept in
    `tokens` and counted in `lengths`.
    on_step(t, ids, active) -> bool[B] or None: called with the host ids chosen at step t and
    the rows still running; may return rows to stop (stop strings, streaming).
    """
    cfg = model.cfg
    B, T = np.shape(input_ids)
    check_generation_args(cfg, T, max_new_tokens)
    rng = np.random.default_rng(options.seed)
    stop = np.array(sorted(set(stop_ids or ())), dtype=np.int64)
    xp = model.xp
    timings = {}

    t0 = time.perf_counter()
    image_tokens = None
    if pixel_values is not None:
        image_tokens = model.encode_images(pixel_values)
        synchronize(xp)
    t1 = time.perf_counter()
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model.prefill(input_ids, attention_mask, image_tokens=image_tokens, cache=cache)
    synchronize(xp)
    t2 = time.perf_counter()
    timings.update(image_encode_s=t1 - t0, prefill_s=t2 - t1, prefill_tokens=int(B * T))

    tokens = np.full((B, max_new_tokens), cfg.pad_token_id, dtype=np.int64)
    lengths = np.zeros(B, dtype=np.int64)
    finish = ["length"] * B
    active = np.ones(B, dtype=bool)
    first_token_at = None
    for t in range(max_new_tokens):
        ids = choose(logits, options, rng)                                  # host int64 [B]
        if first_token_at is None:
            first_token_at = time.perf_counter()
        ids[~active] = cfg.pad_token_id
        tokens[active, t] = ids[active]
        lengths[active] += 1
        hit_stop = active & np.isin(ids, stop)
        for row in np.flatnonzero(hit_stop):
            finish[row] = "eos"
        requested = on_step(t, ids, active.copy()) if on_step is not None else None
        if requested is not None:
            for row in np.flatnonzero(np.asarray(requested) & active & ~hit_stop):
                finish[row] = "stop"
            hit_stop |= np.asarray(requested) & active
        active &= ~hit_stop
        if not active.any() or t == max_new_tokens - 1:
            break
        logits = model.decode_step(ids, cache)
    synchronize(xp)
    t3 = time.perf_counter()
    steps = int(lengths.max()) if B else 0
    timings.update(time_to_first_token_s=first_token_at - t0, decode_s=t3 - first_token_at,
                   decode_steps=max(steps - 1, 0))
    timings["decode_tokens_per_s"] = (timings["decode_steps"] / timings["decode_s"]
                                      if timings["decode_steps"] and timings["decode_s"] > 0 else None)
    width = max(steps, 1)
    return TokenGeneration(tokens[:, :width], lengths, finish, timings)


def greedy_ids(model, input_ids, attention_mask, pixel_values=None, max_new_tokens=32, stop_ids=None):
    """Greedy decoding (HF `generate(do_sample=False)`); host int64 [B, max_new_tokens] when no
    row stops early."""
    out = generate_ids(model, input_ids, attention_mask, pixel_values, max_new_tokens,
                       SamplingOptions(), stop_ids)
    tokens = np.full((out.tokens.shape[0], max_new_tokens), model.cfg.pad_token_id, np.int64)
    tokens[:, :out.tokens.shape[1]] = out.tokens
    return tokens
