"""Gradients for a subset of the parameters (npvlm/training/grads.py): no weight gradient for a frozen
tensor, nothing saved that the requested gradients do not need, no backward into a frozen
vision tower; and the same gradients as when everything is trained."""

import re

import numpy as np
import pytest

import npvlm
from npvlm.errors import InputError
from npvlm.loading.bf16 import BF16Matrix
from npvlm.model.paligemma import backward, forward_loss
from npvlm.training.grads import loss_and_grads, save_plan, with_fp32_masters
from npvlm.tree import flatten

from helpers import GOLDENS, GradGolden

NAME = "pg2_gqa_v5"
# written out here, independently of npvlm.training.grads.PRESETS, so the preset is checked against it
ATTENTION = re.compile(r"text\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")


@pytest.fixture(scope="module")
def setup():
    golden = GradGolden(NAME)
    model = npvlm.load(GOLDENS / NAME / "model")
    batch = model.device_batch(golden.batch)
    _, full = loss_and_grads(batch, model.params, model.cfg, "all")
    return model, batch, flatten(full)


def _saved_arrays(tree, prefix=""):
    """{path: array} of everything a training forward kept."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_saved_arrays(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_saved_arrays(v, f"{prefix}{i}."))
    elif hasattr(tree, "nbytes") and not isinstance(tree, bool):
        out[prefix[:-1]] = tree
    return out


@pytest.mark.parametrize("train, selected", [
    ("attention", lambda n: ATTENTION.fullmatch(n) is not None),
    ("decoder", lambda n: n.startswith("text.")),
    (lambda n: n.startswith("projector."), lambda n: n.startswith("projector.")),
    (lambda n: n == "vision.layers.1.mlp.fc2.weight", lambda n: n == "vision.layers.1.mlp.fc2.weight"),
])
def test_subset_gradients_equal_the_full_ones(setup, train, selected):
    model, batch, full = setup
    trace = {}
    _, grads = loss_and_grads(batch, model.params, model.cfg, train, trace=trace)
    grads = flatten(grads)
    want = {n for n in full if selected(n)}
    assert set(grads) == want, sorted(set(grads) ^ want)
    for name in want:
        np.testing.assert_allclose(grads[name], full[name], rtol=1e-6, atol=1e-9, err_msg=name)
    vision_trained = any(n.startswith("vision.") for n in want)
    assert any(k.startswith("grad.vision.") for k in trace) == vision_trained
    assert ("grad.projector" in trace) == (vision_trained or any(n.startswith("projector.") for n in want))


def test_frozen_parts_keep_nothing_they_do_not_need(setup):
    model, batch, _ = setup
    everything = save_plan(model.params, "all")
    forward_loss(batch, model.params, model.cfg, save=everything)
    attention = save_plan(model.params, "attention")
    forward_loss(batch, model.params, model.cfg, save=attention)
    assert attention["vision"] is None and attention["projector"] is None     # no image side at all
    layer = attention["text"]["layers"][0]
    for proj in ("gate_proj", "up_proj", "down_proj"):                      # frozen MLP weights
        assert layer["mlp"][proj] == {"frozen": True}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj", "gelu", "up"}   # what dx needs
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):                   # trained: their input
        assert "x" in layer["self_attn"][proj]
    assert "x" not in attention["text"]["lm_head"]                          # the tied head is frozen
    full, part = _saved_arrays(everything), _saved_arrays(attention)
    assert not any(k.startswith(("vision.", "projector.")) for k in part)
    # every array of a frozen pass is one the full pass keeps too, and it keeps strictly less
    assert set(part) < set(full)
    size = {k: sum(a.nbytes for a in v.values()) for k, v in (("all", full), ("attention", part))}
    print(f"\nsaved for backward: all {size['all']} B, attention only {size['attention']} B")
    assert size["attention"] < 0.75 * size["all"]
    grads = backward(attention, model.params, model.cfg)
    assert set(flatten(grads)) == {n for n in flatten(model.params) if ATTENTION.fullmatch(n)}


def test_bf16_frozen_weights_with_fp32_masters():
    """weights="bf16": the frozen matrices stay bfloat16, the trained ones become fp32 masters;
    the gradients equal those of the fp32 load of the same checkpoint (stored in BF16, so both
    hold the same weight values)."""
    low = npvlm.load(GOLDENS / "pg2_gqa_hub" / "model", weights="bf16")   # a BF16 checkpoint
    ref = npvlm.load(GOLDENS / "pg2_gqa_hub" / "model")
    golden = GradGolden("pg2_gqa_hub")
    params = with_fp32_masters(low.params, "attention")
    flat = flatten(params)
    assert all(isinstance(v, np.ndarray) for n, v in flat.items() if ATTENTION.fullmatch(n))
    assert isinstance(flat["text.layers.0.mlp.up_proj.weight"], BF16Matrix)
    loss_low, g_low = loss_and_grads(low.device_batch(golden.batch), params, low.cfg, "attention")
    loss_ref, g_ref = loss_and_grads(ref.device_batch(golden.batch), ref.params, ref.cfg, "attention")
    assert abs(loss_low - loss_ref) <= 1e-6 * loss_ref
    g_low = flatten(g_low)
    for name, g in flatten(g_ref).items():
        np.testing.assert_allclose(g_low[name], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=name)


def test_bad_training_sets_are_one_line_errors(setup):
    model, batch, _ = setup
    with pytest.raises(InputError, match="unknown training set 'mlp'"):
        save_plan(model.params, "mlp")
    with pytest.raises(InputError, match="no parameter is trained"):
        save_plan(model.params, lambda n: False)
    with pytest.raises(InputError, match="loss reduction must be one of example, token"):
        loss_and_grads(batch, model.params, model.cfg, "attention", "mean")
