"""`PaliGemma.explain` (npvlm/explain): every answer token's log-probability, attention on the
image, gradient with respect to the pixels and logit lens, against transformers and torch
autograd (tests/make_explain_goldens.py), as the forward and gradient parity tests compare:

- committed goldens on the four golden models (PaliGemma 1 MQA and GQA, two PaliGemma 2 with
  softcaps and a sliding window shorter than the sequence), run without torch, on every backend;
- live: fresh random models built by transformers in this run (skipped without torch);
- torch-free: the pixel gradient of a float64 model against central finite differences; the
  API's own promises (greedy tokens equal `generate`'s, a forced answer, the lens's last entry,
  the maps' formulas, one-line errors).

Tolerances: the forward's (npvlm.parity.compare: 1e-5 scaled, 1e-4 relative) for log-probabilities,
attention and the lens; the gradients' (compare_grad: 1e-5 of the tensor's max, or twice torch's
own fp32-vs-fp64 error) for each answer token's pixel gradient.
"""

import json

import numpy as np
import pytest

import npvlm
from npvlm.demo import SAMPLE_SCENE
from npvlm.errors import InputError
from npvlm.explain import maps
from npvlm.explain.attribute import explain_tokens
from npvlm.inputs.image import load_image
from npvlm.model import paligemma
from npvlm.parity import compare, compare_grad
from npvlm.tree import map_with_path

from helpers import (
    BACKENDS,
    EXPLAIN_FORMAT_VERSION,
    GOLDEN_MODELS,
    GOLDENS,
    LIVE_SPECS,
    REGENERATE_EXPLAIN,
    golden_meta,
)

FIELDS = ("logprobs", "image_attention", "logit_lens", "lens_top_logprobs")


def explain_golden(name, backend="numpy"):
    golden_meta("explain_meta.json", REGENERATE_EXPLAIN, EXPLAIN_FORMAT_VERSION)
    path = GOLDENS / name / "explain.npz"
    if not path.is_file():
        pytest.fail(f"{path} missing; regenerate with: {REGENERATE_EXPLAIN}")
    with np.load(path) as data:
        ref = {k: data[k] for k in data.files}
    model = npvlm.load(GOLDENS / name / "model", backend=backend)
    prompt = ref["batch.input_ids"]
    batch = model.device_batch({"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                                "pixel_values": ref["batch.pixel_values"]})
    exp = explain_tokens(batch, ref["tokens"].tolist(), model.params, model.cfg, top_k=ref["lens_top_ids"].shape[-1])
    return exp, ref


def check(exp, ref, label):
    """Every field of the explanation against the reference; prints one line per tensor."""
    results = [compare(f"{label} {k}", getattr(exp, k), ref[k], atol=lambda m, k=k: max(1e-5 * max(1.0, m),
                                                                                         2.0 * float(ref[f"noise.{k}"])))
               for k in FIELDS]
    for i in range(len(exp.tokens)):
        results.append(compare_grad(f"{label} pixel_grads[{i}]", exp.pixel_grads[i], ref["pixel_grads"][i],
                                    ref["noise.pixel_grads"][i]))
    for r in results:
        print(r)
    assert all(r.ok for r in results), [r.name for r in results if not r.ok]
    np.testing.assert_array_equal(exp.lens_top_ids, ref["lens_top_ids"])
    np.testing.assert_array_equal(exp.lens_rank, ref["lens_rank"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_explanations_match_transformers_and_autograd(name, backend):
    exp, ref = explain_golden(name, backend)
    assert exp.tokens == ref["tokens"].tolist()
    check(exp, ref, name)
    model = npvlm.load(GOLDENS / name / "model")
    full = [l for l in range(model.cfg.text.num_hidden_layers) if model.cfg.text.layer_type(l) == "full_attention"]
    assert full and (exp.image_attention[:, full].sum(-1) > 0).all()        # unmasked layers do look


@pytest.mark.live
@pytest.mark.parametrize("spec_name", sorted(LIVE_SPECS))
def test_live_explanations_match_transformers(spec_name, torch_and_transformers, tmp_path):
    import make_explain_goldens as mk

    import hf_reference as ref
    spec = LIVE_SPECS[spec_name]
    hf = ref.build_tiny_model(spec, seed=77)
    ref.save_hub_layout(hf, str(tmp_path / "model"), dtype="f32", n_shards=1)
    model = npvlm.load(tmp_path / "model")
    prompt, answer, pixels = mk.make_inputs(spec)
    got = mk.reference(hf, prompt, answer, pixels, spec["image_token_index"])
    exact = mk.reference(hf.double(), prompt, answer, pixels, spec["image_token_index"])
    golden = dict(got)
    for k in FIELDS:
        golden[f"noise.{k}"] = np.abs(got[k] - exact[k]).max()
    golden["noise.pixel_grads"] = np.abs(got["pixel_grads"] - exact["pixel_grads"]).reshape(len(answer), -1).max(1)
    batch = model.device_batch({"input_ids": prompt, "attention_mask": np.ones_like(prompt), "pixel_values": pixels})
    check(explain_tokens(batch, answer.tolist(), model.params, model.cfg, top_k=mk.TOP_K), golden, spec_name)


# ---- torch-free ---------------------------------------------------------------------------------

def test_pixel_gradients_equal_finite_differences_in_float64():
    """d logprob_i / d pixels of a float64 model against central differences of its training
    loss for token i alone (-logprob_i, paligemma.forward_loss) along random directions (no
    torch): the backward is the derivative of the forward it explains."""
    model = npvlm.load(GOLDENS / "pg2_gqa_v5" / "model")
    params = map_with_path(lambda _, a: np.asarray(a, np.float64), model.params)
    with np.load(GOLDENS / "pg2_gqa_v5" / "explain.npz") as data:
        prompt, pixels, tokens = data["batch.input_ids"], data["batch.pixel_values"].astype(np.float64), \
            data["tokens"].tolist()
    exp = explain_tokens({"input_ids": prompt, "attention_mask": np.ones_like(prompt), "pixel_values": pixels},
                         tokens, params, model.cfg)
    T0, n = prompt.shape[1], len(tokens)
    ids = np.concatenate([prompt, [tokens]], axis=1)
    types = np.concatenate([np.zeros_like(prompt), np.ones((1, n), np.int64)], axis=1)

    def logprob(i, pix):
        labels = np.full_like(ids, -100)
        labels[0, T0 + i] = tokens[i]                          # predicted at T0 + i - 1 = p_i
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": types,
                 "labels": labels, "pixel_values": pix}
        return -float(paligemma.forward_loss(batch, params, model.cfg, "token"))

    rng, eps = np.random.default_rng(0), 1e-5
    for i in range(n):
        assert logprob(i, pixels) == pytest.approx(float(exp.logprobs[i]), abs=1e-6)
        v = rng.standard_normal(pixels.shape)
        numeric = (logprob(i, pixels + eps * v) - logprob(i, pixels - eps * v)) / (2 * eps)
        analytic = float((exp.pixel_grads[i].astype(np.float64) * v[0]).sum())
        print(f"token {i}: analytic {analytic:.9e}, numeric {numeric:.9e}")
        assert abs(analytic - numeric) <= 1e-5 * max(1e-3, abs(numeric))


def test_a_confident_tokens_gradient_is_as_exact_as_in_float64():
    """The demo answers "yellow" then <eos> with p within 2e-5 and 2e-7 of 1: 1 - p, the scale of
    their gradients, is summed from the other tokens' probabilities, so the fp32 explanation
    equals a float64 model's to 1e-4 (onehot - softmax in fp32 would keep no digit of it), and
    log p to 2e-5 of itself."""
    model = npvlm.load("demo")
    inputs = model.processor([load_image(SAMPLE_SCENE)], ["answer en what color is the circle?"])
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    tokens = model.generate(SAMPLE_SCENE, "answer en what color is the circle?").tokens
    f32 = explain_tokens(batch, tokens, model.params, model.cfg)
    f64 = explain_tokens(dict(batch, pixel_values=batch["pixel_values"].astype(np.float64)), tokens,
                         map_with_path(lambda _, a: np.asarray(a, np.float64), model.params), model.cfg)
    assert (f32.logprobs > -1e-4).all() and (f32.logprobs < 0).all()
    for i in range(len(tokens)):
        rel = np.abs(f32.pixel_grads[i] - f64.pixel_grads[i]).max() / np.abs(f64.pixel_grads[i]).max()
        print(f"token {i}: log p {f32.logprobs[i]:.3e}, pixel gradient relative difference {rel:.1e}")
        assert rel < 1e-4
        # fp32 logits carry ~1e-6 of absolute error, and log p = -sum_j exp(z_j - z_token) inherits it
        assert abs(f32.logprobs[i] - f64.logprobs[i]) <= 2e-5 * abs(f64.logprobs[i])


@pytest.fixture(scope="module")
def demo():
    return npvlm.load("demo")


def test_greedy_explanations_are_generates_answer(demo):
    prompt = "answer en what color is the circle?"
    exp = demo.explain(SAMPLE_SCENE, prompt)
    gen = demo.generate(SAMPLE_SCENE, prompt)
    assert exp.tokens == gen.tokens and exp.text == gen.text
    n, L = len(exp.tokens), demo.cfg.text.num_hidden_layers
    assert exp.image_attention.shape == (n, L, demo.cfg.text.num_attention_heads, demo.cfg.num_image_tokens)
    assert exp.pixel_grads.shape == (n, 3, demo.cfg.vision.image_size, demo.cfg.vision.image_size)
    assert exp.logit_lens.shape == (n, L + 1) and exp.lens_top_ids.shape == (n, L + 1, 5)
    # greedy: each token is the arg-max, so the top of the last lens row is the token itself
    assert exp.lens_top_ids[:, -1, 0].tolist() == exp.tokens and (exp.lens_rank[:, -1] == 0).all()
    np.testing.assert_allclose(exp.logit_lens[:, -1], exp.logprobs, rtol=0, atol=1e-5)
    assert (exp.image_attention >= 0).all() and (exp.image_attention.sum(-1) <= 1 + 1e-5).all()
    # every answer token's query sees the whole prefix, so some of its attention is on the image
    assert (exp.image_attention.sum(-1) > 0).all()


def test_a_forced_answer_is_explained_as_given(demo):
    prompt = "answer en what color is the circle?"
    exp = demo.explain(SAMPLE_SCENE, prompt, answer="blue")
    assert exp.text == "blue" and exp.tokens[-1] == demo.cfg.eos_token_id and exp.token_texts[-1] == "<eos>"
    own = demo.explain(SAMPLE_SCENE, prompt)
    assert own.text != "blue" and exp.logprobs[0] < own.logprobs[0]     # the model prefers its own answer
    assert exp.lens_rank[0, -1] > 0


def test_the_maps_follow_their_formulas(demo):
    exp = demo.explain(SAMPLE_SCENE, "caption en", max_new_tokens=4)
    side = demo.cfg.vision.image_size // demo.cfg.vision.patch_size
    p = demo.cfg.vision.patch_size
    g = np.abs(exp.pixel_grads[1]).max(axis=0)
    np.testing.assert_allclose(maps.patch_map(exp, 1, "gradient")[2, 3], g[2 * p:3 * p, 3 * p:4 * p].mean(), rtol=1e-6)
    ixg = (exp.pixel_values * exp.pixel_grads[1]).sum(axis=0)
    np.testing.assert_allclose(maps.patch_map(exp, 1, "input_x_gradient")[2, 3], ixg[2 * p:3 * p, 3 * p:4 * p].sum(),
                               rtol=1e-5)
    att = maps.patch_map(exp, 1, "attention", layers=[0], heads=[1])
    np.testing.assert_array_equal(att.reshape(-1), exp.image_attention[1, 0, 1])
    assert maps.patch_map(exp, 1, "attention").shape == (side, side)
    assert np.abs(maps.normalised(maps.patch_map(exp, 1, "input_x_gradient"))).max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown map kind"):
        maps.patch_map(exp, 0, "lime")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.explain([SAMPLE_SCENE, SAMPLE_SCENE], "caption en"), "one image and one prompt"),
    (lambda m: m.explain(SAMPLE_SCENE, ["caption en"]), "one image and one prompt"),
    (lambda m: m.explain(SAMPLE_SCENE, "caption en", answer=""), "answer must be a non-empty string"),
    (lambda m: m.explain(SAMPLE_SCENE, "caption en", top_k=0), "top_k must be an integer >= 1"),
    (lambda m: m.explain(SAMPLE_SCENE, "caption en", max_new_tokens=0), "max_new_tokens must be"),
    (lambda m: m.explain(SAMPLE_SCENE, "caption en", answer="red " * 200), "more than the model's"),
])
def test_bad_input_is_one_line(demo, call, message):
    with pytest.raises(InputError, match=message) as e:
        call(demo)
    assert "\n" not in str(e.value)


def test_the_goldens_hold_what_the_meta_says():
    meta = json.loads((GOLDENS / "explain_meta.json").read_text())
    for name in GOLDEN_MODELS:
        with np.load(GOLDENS / name / "explain.npz") as data:
            assert data["tokens"].tolist() == meta["models"][name]["answer_ids"]
            assert data["tokens"][-1] == 1                                   # the answer ends at <eos>


def test_the_maps_measurement_on_held_out_scenes(demo):
    """npvlm.demo.interpret on 10 held-out scenes: the structure of its results; greying the
    patches the gradient ranks first costs the answer more than greying random ones (4.4 against
    0.6 nats at 25% on 200 scenes, docs/interpretability.md); and the prefix effect: the image
    positions' states equal at the embeddings, different after the first layer (the prefix-LM
    mask lets them attend to the prompt)."""
    from npvlm.demo.interpret import FRACTIONS, MAP_KINDS, measure
    r = measure(demo, n_scenes=10)
    assert set(r["deletion"]) == set(MAP_KINDS) and r["questions"] >= 10
    assert all(set(d) == {str(f) for f in FRACTIONS} for d in r["deletion"].values())
    assert r["deletion"]["gradient"]["0.25"] > 2 * r["deletion"]["random"]["0.25"] > 0
    change = r["prefix_change"]
    assert len(change) == demo.cfg.text.num_hidden_layers + 1
    assert change[0] == 0 and all(c > 0.05 for c in change[1:])
