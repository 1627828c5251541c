"""The CuPy code paths, rehearsed on the CPU with tests/fake_cupy.py (strict like CuPy: no NumPy
arrays mixed with device arrays, no implicit conversion to NumPy, reductions stay arrays).

Everything a GPU run does goes through here once: load with backend="cupy", prefill, decode,
greedy generation, sampling, the training loss and every gradient (all parameters and LoRA), an
SGD and an AdamW step, a short `python -m npvlm.finetune --backend cupy`, an explanation and
`python -m npvlm.evaluate --backend cupy`. Each result equals
the NumPy backend's. The fake cannot find CUDA-only failures (kernels, memory, TF32); those wait
for tools/gpu_check.sh on a GPU machine."""

import numpy as np
import pytest

import npvlm
from npvlm import finetune
from npvlm.backend import to_host
from npvlm.demo.scenes import make_scene
from npvlm.generation.generate import generate_ids
from npvlm.generation.sampling import SamplingOptions
from npvlm.training.grads import loss_and_grads, trained_arrays
from npvlm.training.optim import SGD, AdamW
from npvlm.tree import flatten

import fake_cupy
from helpers import GOLDENS, GradGolden, make_data

MODELS = ["pg1_mqa_hub", "pg2_gqa_v5"]


@pytest.fixture(params=MODELS)
def pair(request, monkeypatch):
    """(numpy model, fake-cupy model, golden batch) for one gradient-golden model."""
    fake_cupy.install(monkeypatch)
    path = GOLDENS / request.param / "model"
    golden = GradGolden(request.param)
    return npvlm.load(path), npvlm.load(path, backend="cupy"), golden.batch


def host(tree):
    return {k: to_host(v) for k, v in flatten(tree).items()}


def test_the_fake_is_strict(monkeypatch):
    xp = fake_cupy.install(monkeypatch)
    a = xp.ones((2, 3), np.float32)
    with pytest.raises(TypeError):
        a + np.ones((2, 3), np.float32)          # a host array in a device operation
    with pytest.raises(TypeError):
        np.asarray(a)                           # an implicit device -> host conversion
    assert isinstance(a.sum(), fake_cupy.DeviceArray)
    assert type(npvlm.load("demo", backend="cupy").params["text"]["norm"]["weight"]) is fake_cupy.DeviceArray


def test_prefill_and_decode_equal_numpy(pair):
    cpu, dev, batch = pair
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    B, T = batch["input_ids"].shape
    cache, dcache = cpu.new_cache(B, T + 1), dev.new_cache(B, T + 1)
    want = cpu.prefill(**inputs, cache=cache, logits_for="all")
    got = dev.prefill(**inputs, cache=dcache, logits_for="all")
    assert isinstance(got, fake_cupy.DeviceArray)
    np.testing.assert_array_equal(to_host(got), want)
    ids = want[:, -1].argmax(-1)
    want_step = cpu.decode_step(ids, cache)
    got_step = dev.decode_step(ids, dcache)
    np.testing.assert_array_equal(to_host(got_step), want_step)


def test_generation_equals_numpy_and_syncs_only_the_ids(pair):
    cpu, dev, batch = pair
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    sampled = SamplingOptions(temperature=0.9, top_k=20, top_p=0.9, seed=3)
    for options in (SamplingOptions(), sampled):
        want, got = (generate_ids(m, prompt, 12, options).tokens for m in (cpu, dev))
        np.testing.assert_array_equal(got, want)

    def syncs(n):                        # no stop ids: exactly n tokens per row
        fake_cupy.DeviceArray.syncs = 0
        assert generate_ids(dev, prompt, n).tokens.shape[1] == n
        return fake_cupy.DeviceArray.syncs
    assert syncs(10) == syncs(2), "a decode step turns a device value into a Python value"


def test_text_generation_equals_numpy(monkeypatch):
    fake_cupy.install(monkeypatch)
    cpu, dev = npvlm.load("demo"), npvlm.load("demo", backend="cupy")
    images = [make_scene(np.random.default_rng([7, i])).image for i in range(3)]
    prompts = ["caption en", "detect circle", "answer en how many shapes are there?"]
    assert [str(g) for g in dev.generate(images, prompts, max_new_tokens=24)] == \
        [str(g) for g in cpu.generate(images, prompts, max_new_tokens=24)]


@pytest.mark.parametrize("train", ["all", "lora"])
def test_loss_and_every_gradient_equal_numpy(pair, train):
    cpu, dev, batch = pair
    if train == "lora":
        from npvlm.training.lora import add_lora
        for model in (cpu, dev):
            model.params, _ = add_lora(model.params, rank=4, alpha=8, seed=1)
    loss, grads = loss_and_grads(cpu.device_batch(batch), cpu.params, cpu.cfg, train)
    dloss, dgrads = loss_and_grads(dev.device_batch(batch), dev.params, dev.cfg, train)
    assert float(dloss) == float(loss)
    want, got = host(grads), host(dgrads)
    assert got.keys() == want.keys() and want
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("make", [lambda: SGD(momentum=0.9, weight_decay=0.01), lambda: AdamW(weight_decay=0.1)])
def test_optimizer_steps_equal_numpy(pair, make):
    cpu, dev, batch = pair
    for model in (cpu, dev):
        model.opt = make()
        for _ in range(2):
            _, grads = loss_and_grads(model.device_batch(batch), model.params, model.cfg, "attention")
            model.opt.step(trained_arrays(model.params, "attention"), flatten(grads), 1e-2)
    want, got = host(trained_arrays(cpu.params, "attention")), host(trained_arrays(dev.params, "attention"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("train", ["attention", "lora"])
def test_finetune_command_on_the_cupy_backend(tmp_path, monkeypatch, train):
    """The command trains and exports on the device as on the host (LoRA: merged on export)."""
    fake_cupy.install(monkeypatch)
    data = make_data(tmp_path / "d", n=4)
    common = ["--model", "demo", "--data", str(data), "--train", train, "--optimizer", "adamw",
              "--lr", "1e-3", "--steps", "2", "--batch-size", "2", "--save-dtype", "float32", "--quiet"]
    assert finetune.main([*common, "--out", str(tmp_path / "cpu")]) == 0
    assert finetune.main([*common, "--out", str(tmp_path / "gpu"), "--backend", "cupy"]) == 0
    want, got = (host(npvlm.load(tmp_path / d).params) for d in ("cpu", "gpu"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_explanations_equal_numpy(pair):
    """PaliGemma.explain's computation on the device: the same explanation as on the CPU."""
    from npvlm.explain.attribute import explain_tokens
    cpu, dev, batch = pair
    prompt = {"input_ids": batch["input_ids"][-1:, -6:], "attention_mask": np.ones((1, 6), np.int64),
              "pixel_values": batch["pixel_values"][-1:]}
    prompt["input_ids"] = np.concatenate([np.full((1, cpu.cfg.num_image_tokens), cpu.cfg.image_token_index),
                                          prompt["input_ids"]], axis=1)
    prompt["attention_mask"] = np.ones_like(prompt["input_ids"])
    tokens = [5, 7, 1]
    want = explain_tokens(cpu.device_batch(prompt), tokens, cpu.params, cpu.cfg)
    got = explain_tokens(dev.device_batch(prompt), tokens, dev.params, dev.cfg)
    for name in ("logprobs", "image_attention", "pixel_grads", "logit_lens", "lens_top_ids", "lens_rank",
                 "pixel_values"):
        value = getattr(got, name)
        assert type(value) is np.ndarray, name                    # host arrays, as documented
        np.testing.assert_array_equal(value, getattr(want, name), err_msg=name)


def test_evaluate_command_on_the_cupy_backend(tmp_path, monkeypatch, capsys):
    """`python -m npvlm.evaluate --backend cupy`: the same answers, log-probabilities (detection
    scores) and scores as on the host."""
    import json

    from npvlm import evaluate

    from test_evaluate import demo_data
    fake_cupy.install(monkeypatch)
    data = demo_data(tmp_path, n_scenes=2)
    outs = []
    for backend in ("numpy", "cupy"):
        pred = tmp_path / f"{backend}.jsonl"
        assert evaluate.main(["--model", "demo", "--data", str(data), "--backend", backend, "--json", "--quiet",
                              "--predictions", str(pred)]) == 0
        outs.append((json.loads(capsys.readouterr().out)["scores"], pred.read_text()))
    assert outs[0] == outs[1] and "objects" in outs[0][1]
