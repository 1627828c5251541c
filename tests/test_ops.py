"""Tier 1: each building block against its formula or hand-computed values (no HF needed), on
every usable backend (the `xp` fixture: NumPy, and CuPy where a GPU is usable)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from npvlm.backend import to_host
from npvlm.model.attention import attention
from npvlm.model.layers import gelu_tanh, layer_norm, rms_norm, softcap, softmax
from npvlm.model.masks import additive, decode_mask, prefill_masks, prefix_lm_mask
from npvlm.model.rope import apply_rope, prompt_positions, rope_tables
from npvlm.model.siglip import patchify

rng = np.random.default_rng(0)


def host(x):
    return np.asarray(to_host(x))


def cfg(scale, cap=None):
    return SimpleNamespace(attn_scale=scale, attn_logit_softcapping=cap)


def test_rms_norm_uses_one_plus_weight(xp):
    x = np.array([[3.0, 4.0]], np.float32)              # mean(x^2) = 12.5
    w = np.array([0.0, 1.0], np.float32)                # scale = 1 + w = [1, 2]
    expected = x / math.sqrt(12.5 + 1e-6) * np.array([1.0, 2.0])
    np.testing.assert_allclose(host(rms_norm(xp.asarray(x), xp.asarray(w), 1e-6)), expected, rtol=1e-6)


def test_layer_norm_biased_variance(xp):
    x = rng.normal(size=(2, 5)).astype(np.float32)
    w, b = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b
    ours = layer_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b), 1e-6)
    np.testing.assert_allclose(host(ours), ref, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_values(xp):
    # 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) at hand-picked points
    for x, y in [(0.0, 0.0), (1.0, 0.8411920), (-1.0, -0.1588080), (3.0, 2.9963627)]:
        assert abs(float(host(gelu_tanh(xp.asarray([x], xp.float32)))[0]) - y) < 1e-6


def test_softmax_and_softcap(xp):
    x = xp.asarray([[1000.0, 1000.0, -np.inf]], xp.float32)
    np.testing.assert_allclose(host(softmax(x)), [[0.5, 0.5, 0.0]])
    assert abs(float(host(softcap(xp.asarray(1e6, xp.float32), 50.0))) - 50.0) < 1e-4
    assert abs(float(host(softcap(xp.asarray(1.0, xp.float32), 50.0))) - 1.0) < 1e-3


def test_rope_is_a_rotation_of_split_halves(xp):
    E = 8
    rope = rope_tables(xp.asarray([[1, 2, 7]]), E, 10000.0)
    x = rng.normal(size=(1, 1, 3, E)).astype(np.float32)
    y = host(apply_rope(xp.asarray(x), rope))
    # pair (i, i + E/2) rotates by angle pos * theta^(-2i/E); norms are kept
    i, t = 1, 2
    angle = 7 * 10000.0 ** (-2 * i / E)
    a, b = x[0, 0, t, i], x[0, 0, t, i + E // 2]
    np.testing.assert_allclose([y[0, 0, t, i], y[0, 0, t, i + E // 2]],
                               [a * math.cos(angle) - b * math.sin(angle),
                                b * math.cos(angle) + a * math.sin(angle)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_position_difference(xp):
    E = 16
    q = xp.asarray(rng.normal(size=(1, 1, 1, E)).astype(np.float32))
    k = xp.asarray(rng.normal(size=(1, 1, 1, E)).astype(np.float32))

    def score(pq, pk):
        rq, rk = rope_tables(xp.asarray([[pq]]), E, 10000.0), rope_tables(xp.asarray([[pk]]), E, 10000.0)
        return float(host((apply_rope(q, rq) * apply_rope(k, rk)).sum()))
    assert abs(score(5, 3) - score(12, 10)) < 1e-4


@pytest.mark.parametrize("Hq, Hk", [(4, 1), (4, 2), (4, 4)])
def test_grouped_attention_equals_repeated_kv(xp, Hq, Hk):
    B, T, S, E = 2, 3, 5, 4
    q = rng.normal(size=(B, Hq, T, E)).astype(np.float32)
    k = rng.normal(size=(B, Hk, S, E)).astype(np.float32)
    v = rng.normal(size=(B, Hk, S, E)).astype(np.float32)
    mask = host(additive(xp.asarray(rng.random((B, 1, T, S)) > 0.3), np.float32))
    out = attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), xp.asarray(mask), cfg(0.5))
    kr, vr = np.repeat(k, Hq // Hk, axis=1), np.repeat(v, Hq // Hk, axis=1)  # HF repeat_kv order
    probs = softmax((q @ kr.swapaxes(-1, -2)) * 0.5 + mask)
    ref = (probs @ vr).transpose(0, 2, 1, 3).reshape(B, T, Hq * E)
    np.testing.assert_allclose(host(out), ref, rtol=1e-5, atol=1e-6)


def test_softcapped_attention_caps_before_the_mask(xp):
    q = rng.normal(size=(1, 2, 3, 4)).astype(np.float32) * 10
    k = rng.normal(size=(1, 2, 3, 4)).astype(np.float32) * 10
    mask = host(additive(xp.asarray(np.tril(np.ones((3, 3), bool))[None, None]), np.float32))
    out = attention(xp.asarray(q), xp.asarray(k), xp.asarray(k), xp.asarray(mask), cfg(0.5, 5.0))
    probs = softmax(5.0 * np.tanh(q @ k.swapaxes(-1, -2) * 0.5 / 5.0) + mask)
    np.testing.assert_allclose(host(out), (probs @ k).transpose(0, 2, 1, 3).reshape(1, 3, 8), rtol=1e-5, atol=1e-6)


def test_prefix_lm_mask_matches_docstring_example(xp):
    am = xp.asarray([[0, 1, 1, 1, 1, 1]])            # one left pad, prefix a b c, suffix x y
    tt = xp.asarray([[0, 0, 0, 0, 1, 1]])
    allowed = host(prefix_lm_mask(am, tt, np.float32))[0, 0] == 0
    expected = np.array([[0, 0, 0, 0, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 0],
                         [0, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(allowed, expected)


def test_fully_masked_rows_give_no_nan(xp):
    am = xp.asarray([[0, 0, 1]])
    mask = prefix_lm_mask(am, xp.zeros_like(am), np.float32)
    q = xp.asarray(rng.normal(size=(1, 2, 3, 4)).astype(np.float32))
    out = attention(q, q[:, :1], q[:, :1], mask, cfg(1.0))
    assert np.isfinite(host(mask)).all() and np.isfinite(host(out)).all()


def test_decode_mask_sees_only_real_keys(xp):
    m = host(decode_mask(xp.asarray([[0, 1, 1]]), np.float32))
    assert m.shape == (1, 1, 1, 3) and m[0, 0, 0, 0] < -1e30 and (m[0, 0, 0, 1:] == 0).all()


def test_patchify_matches_convolution(xp):
    B, C, R, P, D = 1, 3, 28, 14, 5
    x = rng.normal(size=(B, C, R, R)).astype(np.float32)
    w = rng.normal(size=(D, C, P, P)).astype(np.float32)
    ours = host(patchify(xp.asarray(x), P) @ xp.asarray(w.reshape(D, -1).T))          # [B, N, D]
    ref = np.array([[np.sum(x[0, :, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P] * w[d])
                     for d in range(D)] for gy in range(2) for gx in range(2)])
    np.testing.assert_allclose(ours[0], ref, rtol=1e-4, atol=1e-4)


def test_prompt_positions_are_one_indexed_from_the_first_real_token(xp):
    """HF PaliGemma counts positions from 1 and left padding does not shift them (docs/spec.md §7.3)."""
    am = xp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(host(prompt_positions(am)), [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]])


def test_prefill_masks_per_layer_type(xp):
    am, tt = xp.ones((1, 6), int), xp.asarray([[0, 0, 0, 0, 1, 1]])
    gemma1 = prefill_masks(am, tt, SimpleNamespace(sliding_window=None), np.float32)
    assert list(gemma1) == ["full_attention"]
    np.testing.assert_array_equal(host(gemma1["full_attention"]), host(prefix_lm_mask(am, tt, np.float32)))
    gemma2 = prefill_masks(am, tt, SimpleNamespace(sliding_window=2), np.float32)
    np.testing.assert_array_equal(host(gemma2["sliding_attention"]), host(prefix_lm_mask(am, tt, np.float32, 2)))
