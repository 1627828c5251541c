"""Sampling: the filtered distributions against HF's logits warpers, and the draw itself."""

import numpy as np
import pytest

from npvlm.backend import to_host
from npvlm.errors import InputError
from npvlm.generation.sampling import SamplingOptions, choose, filtered_probs, row_generators

rng = np.random.default_rng(0)


def host(x):
    return np.asarray(to_host(x))


def test_greedy_is_argmax(xp):
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    np.testing.assert_array_equal(choose(xp.asarray(logits), SamplingOptions(), None), logits.argmax(-1))


def test_top_k_and_top_p_by_hand(xp):
    logits = xp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)))

    def probs(*args, **kwargs):
        return host(filtered_probs(logits, *args, **kwargs))
    np.testing.assert_allclose(probs(1.0, top_k=2), [[0.625, 0.375, 0, 0]], rtol=1e-6)
    # mass before each sorted token: 0, .5, .8, .95 -> top_p=0.8 keeps the first two
    np.testing.assert_allclose(probs(1.0, top_p=0.8), [[0.625, 0.375, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(probs(1.0, top_p=0.81), [[0.5, 0.3, 0.15, 0]] / np.float32(0.95), rtol=1e-6)
    np.testing.assert_allclose(probs(1.0, top_p=0.1), [[1, 0, 0, 0]])   # top-1 always kept
    hot = probs(2.0)       # temperature 2 flattens: p ~ sqrt(p0)
    np.testing.assert_allclose(hot, np.sqrt([[0.5, 0.3, 0.15, 0.05]]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum(), rtol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.9), (0.8, 10, 0.5)])
def test_filters_match_hf_warpers(torch_and_transformers, temperature, top_k, top_p):
    torch, transformers = torch_and_transformers
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    logits = rng.normal(scale=3.0, size=(4, 300)).astype(np.float32)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = torch.softmax(warpers(None, torch.from_numpy(logits)), -1).numpy()
    ours = filtered_probs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(ours > 0, ref > 0)     # same kept sets
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)


def test_draw_follows_the_distribution_and_the_seed(xp):
    logits = xp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000, np.float32)))
    opts = SamplingOptions(temperature=1.0, seed=7)
    a = choose(logits, opts, np.random.default_rng(7))
    b = choose(logits, opts, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    freq = np.bincount(a, minlength=4) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    capped = choose(logits, SamplingOptions(temperature=1.0, top_k=1), np.random.default_rng(1))
    assert (capped == 0).all()


def test_zero_probability_tokens_are_never_drawn(xp):
    logits = xp.asarray(np.array([[-np.inf, 0.0, -np.inf, 0.0, -np.inf]] * 2000, np.float32))
    ids = choose(logits, SamplingOptions(temperature=1.0), np.random.default_rng(3))
    assert set(np.unique(ids)) == {1, 3}


def test_each_row_samples_as_it_would_alone(xp):
    """Per-row generators with the same seed: a row's draws do not depend on the other rows."""
    logits = xp.asarray(rng.normal(scale=2.0, size=(3, 40)).astype(np.float32))
    opts = SamplingOptions(temperature=1.0, seed=11)
    rows = row_generators(11, 3)
    together = [choose(logits, opts, rows) for _ in range(5)]
    for b in range(3):
        alone = row_generators(11, 1)
        np.testing.assert_array_equal([t[b] for t in together],
                                      [choose(logits[b:b + 1], opts, alone)[0] for _ in range(5)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(seed=-3), "seed"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingOptions(**kwargs)
