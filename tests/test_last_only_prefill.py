"""The prefill's last-position-only final layer (used when only the next token's logits are
wanted) against the full layer: the same logits to rounding and a bit-identical KV cache."""

import numpy as np
import pytest

import npvlm

from conftest import GOLDENS


@pytest.mark.parametrize("golden_name", ["pg1_gqa_v5", "pg2_gqa_v5"])
def test_last_only_prefill_equals_full_prefill(golden_name):
    """With logits_for="last", the final layer runs for the last position only: the same
    next-token logits (to rounding: a 1-row product) and a bit-identical KV cache."""
    folder = GOLDENS / golden_name
    with np.load(folder / "goldens.npz") as g:
        ids, mask, pixels, types = (g[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                   "token_type_ids"))
    model = npvlm.load(folder / "model")
    B, T = ids.shape
    cache_last, cache_all = model.new_cache(B, T + 4), model.new_cache(B, T + 4)
    last = model.prefill(ids, mask, pixels, types, cache=cache_last)
    full = model.prefill(ids, mask, pixels, types, cache=cache_all, logits_for="all")[:, -1]
    np.testing.assert_allclose(last, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert cache_last.length == cache_all.length
    for a, b in zip(cache_last.keys + cache_last.values, cache_all.keys + cache_all.values):
        np.testing.assert_array_equal(a, b)
