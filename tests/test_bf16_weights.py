"""weights="bf16": matrices kept as bfloat16 bits and widened block by block (npvlm/loading/bf16.py).
On the BF16 checkpoints (as all official ones are) it must equal HF at the fp32 tolerances,
stage by stage and token for token, in half the memory."""

import numpy as np
import pytest

import npvlm
from npvlm.errors import InputError
from npvlm.generation.generate import greedy_ids
from npvlm.loading import bf16
from npvlm.loading.bf16 import BF16Matrix, bf16_to_f32, f32_to_bf16
from npvlm.parity import compare, compare_stages
from npvlm.tree import flatten

from helpers import Golden, one_line_error

BF16_GOLDENS = ["pg1_mqa_hub", "pg2_gqa_hub"]          # stored BF16, like the hub checkpoints
rng = np.random.default_rng(0)


@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3), (4, 5)])     # (4, 5): 20 rows, the GEMM blocks
def test_blocked_product_equals_the_widened_matrix(monkeypatch, lead):
    """Row blocks that do not divide O (and a block of one row) give x @ W^T of the widened W,
    and dy @ W (a backward pass) likewise."""
    O, I = 37, 16
    bits = f32_to_bf16(rng.standard_normal((O, I), dtype=np.float32))
    x = rng.standard_normal(lead + (I,), dtype=np.float32)
    dy = rng.standard_normal(lead + (O,), dtype=np.float32)
    ref, ref_back = x @ bf16_to_f32(bits).T, dy @ bf16_to_f32(bits)
    for rows in (1, 5, 37, 100):
        monkeypatch.setattr(bf16, "BLOCK_ELEMENTS", rows * I)
        monkeypatch.setattr(bf16, "GEMM_BLOCK_ELEMENTS", rows * I)
        out = x @ BF16Matrix(bits).T
        assert out.shape == lead + (O,) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        back = dy @ BF16Matrix(bits)
        assert back.shape == lead + (I,) and back.dtype == np.float32
        np.testing.assert_allclose(back, ref_back, rtol=1e-5, atol=1e-6 * np.abs(ref_back).max())
    w = BF16Matrix(bits)
    ids = np.array([[3, 0], [36, 3]])                 # an embedding lookup: W[ids]
    np.testing.assert_array_equal(w[ids], bf16_to_f32(bits)[ids])


def _real_tokens(golden):
    mask = golden["attention_mask"].astype(bool)
    return lambda name: mask if name.startswith(("text.", "logits")) else None


@pytest.fixture(scope="module", params=BF16_GOLDENS)
def pair(request):
    golden = Golden(request.param)
    return golden, npvlm.load(golden.model_dir, weights="bf16")


def test_bf16_weights_match_hf_every_stage(pair):
    golden, model = pair
    assert model.weights == "bf16" and isinstance(model.params["text"]["embed_tokens"]["weight"], BF16Matrix)
    trace = {}
    model.prefill(golden.batch(), logits_for="all", trace=trace)
    print(f"\n{golden.name}, weights bf16")
    results = compare_stages(trace, golden.arrays, golden.stage_names(), where=_real_tokens(golden))
    assert all(r.ok for r in results), [r.name for r in results if not r.ok]


def test_bf16_weights_greedy_and_batch_match_hf(pair):
    golden, model = pair
    ids, mask, pixels = golden["input_ids"], golden["attention_mask"], golden["pixel_values"]
    ref = golden["greedy_tokens"]
    np.testing.assert_array_equal(greedy_ids(model, ids, mask, pixels, max_new_tokens=ref.shape[1]), ref)
    r = compare("logits[last]", model.prefill(ids, mask, pixels, golden["token_type_ids"]), golden["logits"][:, -1])
    print(r)
    assert r.ok


def test_bf16_weights_take_half_the_memory(pair):
    golden, model = pair
    fp32 = npvlm.load(golden.model_dir)
    nbytes = {name: sum(leaf.nbytes for leaf in flatten(m.params).values()) for name, m in
              (("fp32", fp32), ("bf16", model))}
    print(f"\nparameter bytes: {nbytes}")
    assert 0.45 < nbytes["bf16"] / nbytes["fp32"] < 0.55
    # the stored bf16 values are the checkpoint's: widening them gives the fp32 mode's weights
    for (name, a), (_, b) in zip(flatten(fp32.params).items(), flatten(model.params).items()):
        np.testing.assert_array_equal(a, b.to_f32() if isinstance(b, BF16Matrix) else b, err_msg=name)


def test_f32_checkpoint_is_rounded_to_bf16():
    golden = Golden("pg1_gqa_v5")                      # stored F32
    fp32, low = npvlm.load(golden.model_dir), npvlm.load(golden.model_dir, weights="bf16")
    a, b = fp32.params["text"]["layers"][0]["mlp"]["up_proj"]["weight"], low.params["text"]["layers"][0]["mlp"]["up_proj"]["weight"]
    np.testing.assert_array_equal(b.bits, f32_to_bf16(a))
    assert not np.array_equal(b.to_f32(), a)           # random F32 weights are not bf16 values
    # the position embedding is added, not multiplied: it stays fp32
    assert isinstance(low.params["vision"]["position_embedding"]["weight"], np.ndarray)


def test_f32_to_bf16_rounds_to_nearest_even():
    """Ties go to the even bf16 value, as torch's `.to(torch.bfloat16)` does; NaN stays NaN."""
    one = 0x3F800000                                   # 1.0; a bf16 keeps the top 16 bits
    x = np.array([one, one | 0x8000, one | 0x8001, one | 0x18000, 0x7FC00001], np.uint32).view(np.float32)
    bits = f32_to_bf16(x)
    np.testing.assert_array_equal(bits[:4], [0x3F80, 0x3F80, 0x3F81, 0x3F82])   # tie -> even, above -> up
    assert np.isnan(bf16_to_f32(bits[4:]))[0]


def test_weights_option_errors():
    one_line_error(InputError, lambda: npvlm.load("demo", weights="fp16"), "weights must be one of fp32, bf16")
    one_line_error(InputError, lambda: npvlm.load("demo", backend="cupy", weights="bf16"), "numpy backend")
