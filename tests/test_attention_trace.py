"""Traced attention probabilities (`vision.attn.NN`, `text.attn.NN`): proper distributions over
the allowed keys, and a decode step's map equal to the last row of a full recompute. (Equality
with HF's `attn_weights` is tested in tests/test_live_parity.py.)"""

import numpy as np
import pytest

import npvlm

from helpers import GOLDENS


def _golden(name):
    with np.load(GOLDENS / name / "goldens.npz") as g:
        return npvlm.load(GOLDENS / name / "model"), *(g[k] for k in ("input_ids", "attention_mask", "pixel_values"))


@pytest.mark.parametrize("golden_name", ["pg1_gqa_v5", "pg2_gqa_v5"])
def test_prefill_attention_maps_are_distributions_over_allowed_keys(golden_name):
    model, ids, mask, pixels = _golden(golden_name)
    trace = {}
    model.prefill(ids, mask, pixels, trace=trace)
    B, T = ids.shape
    cfg = model.cfg
    for i in range(len(model.params["vision"]["layers"])):
        probs = trace[f"vision.attn.{i:02d}"]
        assert probs.shape == (B, cfg.vision.num_attention_heads, cfg.num_image_tokens, cfg.num_image_tokens)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    real = mask.astype(bool)
    assert not real.all(), "the golden batch is expected to hold left padding"
    for i in range(len(model.params["text"]["layers"])):
        probs = trace[f"text.attn.{i:02d}"]
        assert probs.shape == (B, cfg.text.num_attention_heads, T, T)
        rows = probs.transpose(0, 2, 1, 3)[real]                         # [real queries, Hq, T]
        np.testing.assert_allclose(rows.sum(-1), 1, atol=1e-5)
        for b in range(B):                                           # no weight on left padding
            assert (probs[b][:, real[b]][:, :, ~real[b]] < 1e-30).all()


@pytest.mark.parametrize("golden_name", ["pg1_gqa_v5", "pg2_gqa_v5"])
def test_decode_step_attention_equals_last_row_of_recompute(golden_name):
    """Decode one token against the cache, and recompute the prompt + that token in one prefill
    (the token as suffix: it sees everything, nothing sees it): the new token's attention map
    in every layer is the same."""
    model, ids, mask, pixels = _golden(golden_name)
    B, T = ids.shape
    new = np.full(B, 7, ids.dtype)
    cache = model.new_cache(B, T + 1)
    model.prefill(ids, mask, pixels, cache=cache)
    step = {}
    model.decode_step(new, cache, trace=step)
    full = {}
    ids2 = np.concatenate([ids, new[:, None]], axis=1)
    mask2 = np.concatenate([mask, np.ones((B, 1), mask.dtype)], axis=1)
    types2 = np.concatenate([np.zeros_like(ids), np.ones((B, 1), ids.dtype)], axis=1)
    model.prefill(ids2, mask2, pixels, types2, logits_for="all", trace=full)
    for i in range(len(model.params["text"]["layers"])):
        name = f"text.attn.{i:02d}"
        assert step[name].shape == (B, model.cfg.text.num_attention_heads, 1, T + 1)
        np.testing.assert_allclose(step[name], full[name][:, :, -1:], rtol=1e-4, atol=1e-6, err_msg=name)
