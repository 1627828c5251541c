"""Tier 1: each building block against its formula or hand-computed values (no HF needed)."""

import math

import numpy as np
import pytest

from npvlm.attention import (additive, apply_rope, attention, decode_mask, prefix_lm_mask,
                             rope_tables)
from npvlm.layers import gelu_tanh, layer_norm, rms_norm, softcap, softmax
from npvlm.siglip import patchify

rng = np.random.default_rng(0)


def test_rms_norm_uses_one_plus_weight():
    x = np.array([[3.0, 4.0]], np.float32)              # mean(x^2) = 12.5
    w = np.array([0.0, 1.0], np.float32)                # scale = 1 + w = [1, 2]
    expected = x / math.sqrt(12.5 + 1e-6) * np.array([1.0, 2.0])
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), expected, rtol=1e-6)


def test_layer_norm_biased_variance():
    x = rng.normal(size=(2, 5)).astype(np.float32)
    w, b = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b
    np.testing.assert_allclose(layer_norm(x, w, b, 1e-6), ref, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_values():
    # 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) at hand-picked points
    for x, y in [(0.0, 0.0), (1.0, 0.8411920), (-1.0, -0.1588080), (3.0, 2.9963627)]:
        assert abs(float(gelu_tanh(np.array([x], np.float32))[0]) - y) < 1e-6


def test_softmax_and_softcap():
    x = np.array([[1000.0, 1000.0, -np.inf]], np.float32)
    np.testing.assert_allclose(softmax(x), [[0.5, 0.5, 0.0]])
    assert abs(float(softcap(np.float32(1e6), 50.0)) - 50.0) < 1e-4
    assert abs(float(softcap(np.float32(1.0), 50.0)) - 1.0) < 1e-3


def test_rope_is_a_rotation_of_split_halves():
    E = 8
    pos = np.array([[1, 2, 7]])
    cos, sin = rope_tables(pos, E, 10000.0)
    x = rng.normal(size=(1, 1, 3, E)).astype(np.float32)
    y = apply_rope(x, cos, sin)
    # pair (i, i + E/2) rotates by angle pos * theta^(-2i/E); norms are kept
    i, t = 1, 2
    angle = 7 * 10000.0 ** (-2 * i / E)
    a, b = x[0, 0, t, i], x[0, 0, t, i + E // 2]
    np.testing.assert_allclose([y[0, 0, t, i], y[0, 0, t, i + E // 2]],
                               [a * math.cos(angle) - b * math.sin(angle),
                                b * math.cos(angle) + a * math.sin(angle)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_position_difference():
    E = 16
    q = rng.normal(size=(1, 1, 1, E)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, E)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rope_tables(np.array([[pq]]), E, 10000.0)
        ck, sk = rope_tables(np.array([[pk]]), E, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())
    assert abs(score(5, 3) - score(12, 10)) < 1e-4


@pytest.mark.parametrize("Hq, Hk", [(4, 1), (4, 2), (4, 4)])
def test_grouped_attention_equals_repeated_kv(Hq, Hk):
    B, T, S, E = 2, 3, 5, 4
    q = rng.normal(size=(B, Hq, T, E)).astype(np.float32)
    k = rng.normal(size=(B, Hk, S, E)).astype(np.float32)
    v = rng.normal(size=(B, Hk, S, E)).astype(np.float32)
    mask = additive(rng.random((B, 1, T, S)) > 0.3, np.float32)
    out = attention(q, k, v, mask, 0.5)
    kr, vr = np.repeat(k, Hq // Hk, axis=1), np.repeat(v, Hq // Hk, axis=1)  # HF repeat_kv order
    p = softmax((q @ kr.swapaxes(-1, -2)) * 0.5 + mask)
    ref = (p @ vr).transpose(0, 2, 1, 3).reshape(B, T, Hq * E)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_prefix_lm_mask_matches_docstring_example():
    am = np.array([[0, 1, 1, 1, 1, 1]])            # one left pad, prefix a b c, suffix x y
    tt = np.array([[0, 0, 0, 0, 1, 1]])
    allowed = prefix_lm_mask(am, tt, np.float32)[0, 0] == 0
    expected = np.array([[0, 0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 0],
                         [0, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(allowed, expected)


def test_fully_masked_rows_give_no_nan():
    am = np.array([[0, 0, 1]])
    mask = prefix_lm_mask(am, np.zeros_like(am), np.float32)
    q = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    out = attention(q, q[:, :1], q[:, :1], mask, 1.0)
    assert np.isfinite(mask).all() and np.isfinite(out).all()


def test_decode_mask_sees_only_real_keys():
    m = decode_mask(np.array([[0, 1, 1]]), np.float32)
    assert m.shape == (1, 1, 1, 3) and m[0, 0, 0, 0] < -1e30 and (m[0, 0, 0, 1:] == 0).all()


def test_patchify_matches_convolution():
    B, C, S, P, D = 1, 3, 28, 14, 5
    x = rng.normal(size=(B, C, S, S)).astype(np.float32)
    w = rng.normal(size=(D, C, P, P)).astype(np.float32)
    ours = patchify(x, P) @ w.reshape(D, -1).T                   # [B, N, D]
    ref = np.array([[np.sum(x[0, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P] * w[d])
                     for d in range(D)] for gy in range(2) for gx in range(2)])
    np.testing.assert_allclose(ours[0], ref, rtol=1e-4, atol=1e-4)


def test_prompt_positions_are_one_indexed_from_the_first_real_token():
    """HF PaliGemma counts positions from 1 and left padding does not shift them (spec: positions)."""
    from npvlm.paligemma import prompt_positions
    am = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(prompt_positions(am), [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]])


def test_prefill_masks_per_layer_type():
    from types import SimpleNamespace
    from npvlm.paligemma import prefill_masks
    am, tt = np.ones((1, 6), int), np.array([[0, 0, 0, 0, 1, 1]])
    gemma1 = prefill_masks(am, tt, SimpleNamespace(sliding_window=None), np.float32)
    assert list(gemma1) == ["full_attention"]
    np.testing.assert_array_equal(gemma1["full_attention"], prefix_lm_mask(am, tt, np.float32))
    gemma2 = prefill_masks(am, tt, SimpleNamespace(sliding_window=2), np.float32)
    np.testing.assert_array_equal(gemma2["sliding_attention"], prefix_lm_mask(am, tt, np.float32, 2))
