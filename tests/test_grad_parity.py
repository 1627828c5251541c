"""Gradient parity: npvlm's training loss and every parameter's gradient against PyTorch
autograd on transformers' PaliGemmaForConditionalGeneration (eager, fp32), as llm.c's
test_gpt2.c compares its gradients with a PyTorch dump.

- committed goldens (tests/make_grad_goldens.py) on the four golden models, run without torch:
  PaliGemma 1 MQA (hub layout, BF16), PaliGemma 1 GQA, and two PaliGemma 2 (softcaps that bite,
  sliding windows shorter than the suffix), a left-padded batch of three examples;
- live: fresh random models built by transformers in this run (skipped without torch).

The reference runs each example alone (positions from the mask, as npvlm derives them for a
padded batch). Tolerance per tensor (npvlm.parity.compare_grad): atol 1e-5 x max|ref| (+ rtol
1e-4), or twice torch's own fp32-vs-fp64 error on that tensor where that is larger.
"""

import numpy as np
import pytest

import npvlm
from npvlm.parity import compare_grad
from npvlm.training.grads import loss_and_grads
from npvlm.tree import flatten

from helpers import BACKENDS, GOLDEN_MODELS, GOLDENS, LIVE_SPECS, GradGolden, tree_path

LOSS_RTOL = 1e-6


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module", params=GOLDEN_MODELS)
def run(request, backend):
    """npvlm's loss and gradients (every parameter trained) on one golden, and the golden."""
    name = request.param
    golden = GradGolden(name)
    model = npvlm.load(GOLDENS / name / "model", backend=backend)
    trace = {}
    loss, grads = loss_and_grads(model.device_batch(golden.batch), model.params, model.cfg, "all", "example",
                                 trace=trace)
    return golden, model, loss, flatten(grads), trace


def test_loss_matches_torch(run):
    golden, _, loss, _, _ = run
    ref = float(golden.arrays["loss.example"])
    print(f"\n{golden.name}: loss {loss:.8f}, torch {ref:.8f}, rel {abs(loss - ref) / ref:.1e}")
    assert abs(loss - ref) <= LOSS_RTOL * abs(ref)


def test_every_parameter_gradient_matches_torch(run):
    golden, _, _, grads, _ = run
    assert set(grads) == set(golden.grads), (sorted(set(grads) ^ set(golden.grads)))
    print(f"\n{golden.name}: {len(grads)} parameter gradients")
    results = [compare_grad(name, grads[name], ref, golden.noise(name)) for name, ref in sorted(golden.grads.items())]
    for r in results:
        print(r)
    assert all(r.ok for r in results), [r.name for r in results if not r.ok]


def test_stage_gradients_match_torch(run):
    """The gradient arriving at every stage output, by the forward's stage names: a learner can
    step backward stage by stage as they step forward."""
    golden, _, _, _, trace = run
    real = golden.batch["attention_mask"].astype(bool)
    results = []
    for name, ref in golden.stages.items():
        where = real if name.startswith("grad.text.") else None
        results.append(compare_grad(name, trace[name], ref, golden.noise(f"stage.{name}"), where=where))
        print(results[-1])
    assert len(results) >= 8 and all(r.ok for r in results), [r.name for r in results if not r.ok]


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_token_reduction_is_hfs_labels_loss(name):
    """"token": the mean over every suffix token of the batch, HF's own `labels=` loss (on the
    padded batch, positions from the mask); "example": big_vision's per-example mean."""
    golden = GradGolden(name)
    model = npvlm.load(GOLDENS / name / "model")
    loss, _ = loss_and_grads(model.device_batch(golden.batch), model.params, model.cfg, "attention", "token")
    for ref in ("loss.token", "loss.hf_labels"):
        assert abs(loss - float(golden.arrays[ref])) <= LOSS_RTOL * abs(loss), (ref, loss, golden.arrays[ref])
    assert abs(float(golden.arrays["loss.example"]) - loss) > 1e-4     # the two reductions differ here


# ---- live: fresh models built by transformers in this run ---------------------------------------

@pytest.fixture(scope="module", params=sorted(LIVE_SPECS))
def live(request, torch_and_transformers, tmp_path_factory):
    import hf_reference as ref
    spec = LIVE_SPECS[request.param]
    hf = ref.build_tiny_model(spec, seed=4321)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    ref.save_hub_layout(hf, str(folder), dtype="f32", n_shards=1)
    examples = ref.make_training_examples(spec, seed=8, lengths=((2, 4), (5, 3)))
    return request.param, hf, npvlm.load(folder), examples


@pytest.mark.live
@pytest.mark.parametrize("reduction", ["example", "token"])
def test_live_gradients_match_torch(live, reduction):
    import copy

    import hf_reference as ref
    name, hf, model, examples = live
    loss_ref, grads_ref, _ = ref.training_reference(hf, examples, reduction)
    _, grads64, _ = ref.training_reference(copy.deepcopy(hf).double(), examples, reduction)   # torch's noise
    loss, grads = loss_and_grads(model.device_batch(ref.left_padded(examples)), model.params, model.cfg, "all", reduction)
    print(f"\n{name} ({reduction}): loss {loss:.8f}, torch {loss_ref:.8f}")
    assert abs(loss - loss_ref) <= LOSS_RTOL * abs(loss_ref)
    grads = flatten(grads)
    results = []
    for hf_name, g in grads_ref.items():
        path = tree_path(hf_name)
        results.append(compare_grad(path, grads[path].reshape(g.shape), g, np.abs(g - grads64[hf_name]).max()))
    for r in sorted(results, key=lambda r: -r.max_rel)[:5]:
        print(r)
    assert len(grads) == len(grads_ref) and all(r.ok for r in results), [str(r) for r in results if not r.ok]
