"""The CPU fast paths (npvlm/kernels.py, the last-position-only final layer of prefill) against
the reference code they replace: bit for bit where the arithmetic is the same."""

import numpy as np
import pytest

import npvlm
from npvlm import kernels
from npvlm.layers import gelu_tanh

from conftest import GOLDENS


def _arrays(shape, seed):
    rng = np.random.default_rng(seed)
    # wide range: the cubic term and tanh saturation both matter; include exact zeros
    gate = (rng.standard_normal(shape) * 4).astype(np.float32)
    gate.reshape(-1)[::97] = 0.0
    up = rng.standard_normal(shape).astype(np.float32)
    return gate, up


# above and below the fast-path threshold; row counts that do not divide into blocks evenly
SHAPES = [(1, 268, 16384), (269, 4099), (3, 1, 1 << 20), (2, 7, 5), (1, 1, 16384)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_tanh_mul_equals_reference_bitwise(shape):
    gate, up = _arrays(shape, 0)
    ref = gelu_tanh(gate) * up
    out = kernels.gelu_tanh_mul(gate.copy(), up.copy())
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_tanh_inplace_equals_reference_bitwise(shape):
    x, _ = _arrays(shape, 1)
    ref = gelu_tanh(x)
    out = kernels.gelu_tanh_(x.copy())
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_fast_path_is_taken_and_works_in_place():
    """The large case really runs blocked (overwriting its argument), so the equality test above
    is not comparing the reference with itself."""
    gate, up = _arrays((300, 4096), 2)
    assert gate.size >= kernels.MIN_ELEMENTS
    u = up.copy()
    out = kernels.gelu_tanh_mul(gate, u)
    assert out is u
    x = gate.copy()
    assert kernels.gelu_tanh_(x) is x


def test_non_contiguous_and_mixed_inputs_take_the_reference_path():
    gate, up = _arrays((600, 4096), 3)
    g, u = gate[::2], up[::2]                      # strided views: must not be written
    g0, u0 = g.copy(), u.copy()
    out = kernels.gelu_tanh_mul(g, u)
    np.testing.assert_array_equal(out, gelu_tanh(g0) * u0)
    np.testing.assert_array_equal(u, u0)
    out64 = kernels.gelu_tanh_mul(gate.astype(np.float64), up)      # dtypes differ
    np.testing.assert_array_equal(out64, gelu_tanh(gate.astype(np.float64)) * up)


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
