"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

Axis legend: B batch, V vocab.

All filtering runs on the model's backend; the random draw is one uniform number per row made
on the host by a seeded NumPy generator and applied by inverse-CDF sampling, so the same seed
gives the same choices on NumPy and CuPy, and only the chosen ids come back to the host. Each
row has its own generator, seeded with the same seed, so a row samples exactly what it samples
alone, whatever else is in the batch.

    greedy       id = argmax(logits)
    temperature  probs = softmax(logits / T)
    top-k        keep the k largest logits, the rest get probability 0
    top-p        sort probs descending, keep the smallest prefix whose mass reaches top_p
                 (a token is kept iff the mass strictly before it is < top_p; the top token always)
    draw         id = first index where cumsum(probs) > u * sum(probs), u ~ U[0, 1)

The order temperature -> top-k -> top-p is the order of HF's logits warpers.
"""

from dataclasses import dataclass

import numpy as np

from ..backend import array_module, to_host
from ..errors import InputError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self):
        return self.temperature == 0


def check_sampling(temperature, top_k, top_p, seed):
    """Validate options with one-line errors (before any model work)."""
    if not _is_number(temperature) or temperature < 0 or not np.isfinite(temperature):
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def _is_number(x):
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def filtered_probs(logits, temperature, top_k=0, top_p=1.0):
    """Next-token distribution after temperature, top-k and top-p. logits [B, V] -> probs [B, V]"""
    xp = array_module(logits)
    z = logits.astype(xp.float32) / temperature
    if top_k and top_k < z.shape[-1]:
        kth = xp.partition(z, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)  # [B, 1]
        z = xp.where(z < kth, -xp.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = xp.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = xp.argsort(-probs, axis=-1)                                   # [B, V] descending
        sorted_p = xp.take_along_axis(probs, order, axis=-1)
        mass_before = xp.cumsum(sorted_p, axis=-1) - sorted_p
        keep_sorted = mass_before < top_p                                     # top-1 always kept
        inverse = xp.argsort(order, axis=-1)                                  # undo the sort
        keep = xp.take_along_axis(keep_sorted, inverse, axis=-1)
        probs = xp.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def row_generators(seed, batch):
    """One np.random.Generator per row, each seeded with `seed` (None: fresh entropy each)."""
    return [np.random.default_rng(seed) for _ in range(batch)]


def choose(logits, options, rngs):
    """Next token id per row as a host int64 array [B]. `rngs`, used when sampling: one
    np.random.Generator per row (`row_generators`), or one Generator drawn from for every row."""
    xp = array_module(logits)
    if options.greedy:
        return to_host(logits.argmax(axis=-1)).astype(np.int64)
    probs = filtered_probs(logits, options.temperature, options.top_k, options.top_p)
    u = (rngs.random(probs.shape[0]) if isinstance(rngs, np.random.Generator)
         else [rng.random() for rng in rngs])
    u = xp.asarray(u, dtype=xp.float32)[:, None]                               # host -> device
    cdf = xp.cumsum(probs, axis=-1)
    ids = (cdf <= u * cdf[:, -1:]).sum(axis=-1)                               # first cdf > u
    ids = xp.minimum(ids, probs.shape[-1] - 1)
    return to_host(ids).astype(np.int64)
