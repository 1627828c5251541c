"""The prefill's shortcut when only the next token's logits are wanted: the final layer runs for
the last position alone, as a decode step (`paligemma.last_position`). Against the full layer:
the same logits to rounding, and the same KV cache, bit for bit except the final layer's last
slot, which holds what a decode step computes (a one-row product: equal to rounding)."""

import numpy as np
import pytest

import npvlm

from helpers import Golden


@pytest.mark.parametrize("golden_name", ["pg1_gqa_v5", "pg2_gqa_v5"])
def test_last_only_prefill_equals_full_prefill(golden_name):
    golden = Golden(golden_name)
    model = npvlm.load(golden.model_dir)
    B, T = golden["input_ids"].shape
    cache_last, cache_all = model.new_cache(B, T + 4), model.new_cache(B, T + 4)
    last = model.prefill(golden.batch(), cache=cache_last)
    full = model.prefill(golden.batch(), cache=cache_all, logits_for="all")[:, -1]
    np.testing.assert_allclose(last, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert cache_last.length == cache_all.length == T
    final = len(cache_all.layers) - 1
    for i, (a, b) in enumerate(zip(cache_last.layers, cache_all.layers)):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)
            if i < final:
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_array_equal(x[:, :, :T - 1], y[:, :, :T - 1])
                np.testing.assert_allclose(x[:, :, T - 1], y[:, :, T - 1], rtol=1e-5,
                                           atol=1e-5 * np.abs(y).max())
                print(f"final layer, last slot {name}: max|diff| {np.abs(x - y).max():.2e}")
