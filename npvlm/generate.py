"""Token-level generation: prefill once, then one cached decode step per new token."""

from .backend import to_host
from .errors import InputError


def greedy_ids(model, input_ids, attention_mask, pixel_values=None, max_new_tokens=32,
               stop_ids=None):
    """Greedy decoding over a left-padded batch. Returns a host int64 array [B, n] of new tokens
    (rows that stopped early are filled with the pad id after their stop token).

    Only the chosen token ids cross from the device to the host each step.
    """
    import numpy as np  # noqa: PLC0415 (host side)
    cfg = model.cfg
    B, T = input_ids.shape
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = cfg.text.max_position_embeddings
    if T + max_new_tokens > limit:
        raise InputError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{T + max_new_tokens} exceeds the model's {limit} positions")
    stop = set(stop_ids or ())
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model.prefill(input_ids, attention_mask, pixel_values, cache=cache)
    out = np.full((B, max_new_tokens), cfg.pad_token_id, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    for t in range(max_new_tokens):
        token = to_host(logits.argmax(axis=-1)).astype(np.int64)       # [B], the only transfer
        token[done] = cfg.pad_token_id
        out[:, t] = token
        done |= np.isin(token, list(stop)) if stop else False
        if done.all() or t == max_new_tokens - 1:
            break
        logits = model.decode_step(token, cache)
    return out
