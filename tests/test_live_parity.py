"""Live parity: fresh random PaliGemma models built by transformers in this test run, saved in
every key scheme, loaded by npvlm and compared stage by stage and token by token.
Skipped with a reason when torch/transformers are absent (.ci/run installs them)."""

import numpy as np
import pytest

import npvlm
from npvlm.generation.generate import greedy_ids
from npvlm.parity import compare, compare_stages
from npvlm.tree import flatten

from helpers import BACKENDS, LIVE_SPECS

pytestmark = pytest.mark.live



@pytest.fixture(scope="module", params=sorted(LIVE_SPECS))
def fresh(request, torch_and_transformers, tmp_path_factory):
    import hf_reference as ref
    spec = LIVE_SPECS[request.param]
    model = ref.build_tiny_model(spec, seed=1234)
    inputs = ref.make_inputs(spec, seed=99)
    stages = ref.capture_stages(model, **inputs, attentions=True)
    plain = {**inputs, "token_type_ids": np.zeros_like(inputs["token_type_ids"])}   # generation input
    tokens = ref.greedy_generate(model, **plain, max_new_tokens=32)
    folders = {}
    root = tmp_path_factory.mktemp(request.param)
    for layout, save in [("save_pretrained", ref.save_with_save_pretrained),
                         ("v5_names", ref.save_v5_layout), ("v452_names", ref.save_v452_layout)]:
        folders[layout] = root / layout
        save(model, str(folders[layout]))
    return request.param, inputs, stages, tokens, folders




def test_every_key_scheme_loads_the_same_weights(fresh):
    _, _, _, _, folders = fresh
    trees = {layout: flatten(npvlm.load(folder).params) for layout, folder in folders.items()}
    first = trees.pop("save_pretrained")
    for layout, tree in trees.items():
        assert tree.keys() == first.keys(), layout
        for name in first:
            np.testing.assert_array_equal(tree[name], first[name], err_msg=f"{layout}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_model_every_stage(fresh, backend):
    name, inputs, stages, _, folders = fresh
    model = npvlm.load(folders["save_pretrained"], backend=backend)
    trace = {}
    model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                  inputs["token_type_ids"], logits_for="all", trace=trace)
    real = inputs["attention_mask"].astype(bool)

    def meaningful(stage):            # real tokens; for attention, the rows of real queries
        if stage.startswith("text.attn."):
            return real[:, None, :]   # [B, 1, T] -> broadcast over heads and keys
        return real if stage.startswith(("text.", "logits")) else None
    print(f"\nlive {name}")
    assert any(n.startswith("vision.attn.") for n in stages) and any(n.startswith("text.attn.") for n in stages)
    results = compare_stages(trace, stages, list(stages), where=meaningful)
    assert all(r.ok for r in results), [r.name for r in results if not r.ok]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_model_greedy_tokens(fresh, backend):
    _, inputs, _, tokens, folders = fresh
    model = npvlm.load(folders["v452_names"], backend=backend)
    ours = greedy_ids(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                      max_new_tokens=tokens.shape[1])
    print(f"\nHF   {tokens.tolist()}\nours {ours.tolist()}")
    np.testing.assert_array_equal(ours, tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_model_last_logits(fresh, backend):
    _, inputs, stages, _, folders = fresh
    model = npvlm.load(folders["v5_names"], backend=backend)
    logits = model.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           inputs["token_type_ids"])
    r = compare("logits[last]", logits, stages["logits"][:, -1])
    print(r)
    assert r.ok
