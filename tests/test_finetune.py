"""`python -m npvlm.finetune`: a JSONL of examples in, a checkpoint in the input's layout out.

A full-batch SGD step is exactly one gradient step; gradient accumulation equals the big batch;
a resumed run ends where an uninterrupted one does; the output keeps the input's files, key
names and dtypes; LoRA starts at the base model and is merged on export; transformers loads the
output and gives npvlm's logits (live). Bad input: test_robustness_finetune.py."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import npvlm
from npvlm import finetune
from npvlm.demo.scenes import make_scene
from npvlm.errors import InputError
from npvlm.inputs.examples import read_jsonl
from npvlm.training.data import make_batch
from npvlm.training.grads import loss_and_grads
from npvlm.tree import flatten

from helpers import GOLDENS, ROOT, make_data, read_safetensors


def stored_dtypes(path):
    """{key: stored dtype ("F32", "BF16", ...)} of a safetensors file."""
    with safe_open(str(path), "np") as st:
        return {k: st.get_slice(k).get_dtype() for k in st.keys()}


def run(*args):
    return finetune.main([*map(str, args), "--quiet"])


def params_of(folder):
    return {k: np.asarray(v.to_f32() if hasattr(v, "to_f32") else v)
            for k, v in flatten(npvlm.load(folder).params).items()}


def test_a_full_batch_sgd_step_is_one_gradient_step(tmp_path):
    data = make_data(tmp_path / "d", n=4)
    assert run("--model", "demo", "--data", data, "--out", tmp_path / "o", "--train", "attention", "--optimizer",
               "sgd", "--lr", 0.5, "--steps", 1, "--batch-size", 4, "--schedule", "constant",
               "--warmup-steps", 0, "--save-dtype", "float32") == 0
    model = npvlm.load("demo")
    _, grads = loss_and_grads(make_batch(model, read_jsonl(data)), model.params, model.cfg, "attention")
    before, after = params_of("demo"), params_of(tmp_path / "o")
    grads = flatten(grads)
    for name in before:
        want = before[name] - 0.5 * grads[name] if name in grads else before[name]
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert any(not np.array_equal(after[n], before[n]) for n in grads)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    data = make_data(tmp_path / "d", n=4)
    common = ("--model", "demo", "--data", data, "--train", "attention", "--optimizer", "sgd", "--lr", 0.5,
              "--steps", 1, "--schedule", "constant", "--warmup-steps", 0, "--save-dtype", "float32")
    run(*common, "--out", tmp_path / "big", "--batch-size", 4)
    run(*common, "--out", tmp_path / "acc", "--batch-size", 2, "--grad-accum", 2)
    a, b = params_of(tmp_path / "big"), params_of(tmp_path / "acc")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, optimizer):
    data = make_data(tmp_path / "d", n=6)
    common = ("--model", "demo", "--data", data, "--train", "attention", "--optimizer", optimizer,
              "--lr", 1e-3, "--momentum", 0.0 if optimizer == "adamw" else 0.9, "--steps", 4, "--batch-size", 2,
              "--shuffle", "--save-dtype", "float32")
    run(*common, "--out", tmp_path / "straight")
    interrupted = finetune.parse_args([*map(str, common), "--out", str(tmp_path / "resumed"), "--quiet"])
    assert finetune.run(interrupted, on_step=lambda entry: entry["step"] == 2) == 0      # stops after step 2
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.work" / "state.npz").is_file()
    # resuming with other options is refused
    with pytest.raises(InputError, match="the saved run used other options"):
        finetune.run(finetune.parse_args([*map(str, common), "--out", str(tmp_path / "x"), "--resume",
                                          "--work", str(tmp_path / "resumed.work"), "--lr", "0.5", "--quiet"]))
    run(*common, "--out", tmp_path / "resumed", "--resume")
    a, b = params_of(tmp_path / "straight"), params_of(tmp_path / "resumed")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    log = json.loads((tmp_path / "resumed" / "npvlm_finetune.json").read_text())["log"]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert not (tmp_path / "resumed.work").exists(), "the training state stays after a finished run"


def test_a_saved_state_is_never_silently_overwritten(tmp_path, capfd):
    """Rerunning without --resume is refused while a state is saved (both ways out named, the
    state untouched); --restart discards it and starts from step 0."""
    data = make_data(tmp_path / "d", n=4)
    common = ["--model", "demo", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "3",
              "--batch-size", "2", "--quiet"]
    assert finetune.run(finetune.parse_args(common), on_step=lambda entry: entry["step"] == 2) == 0
    state = tmp_path / "o.work" / "state.npz"
    before = state.read_bytes()
    capfd.readouterr()
    assert finetune.main(common) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "step 2" in err and "--resume" in err and "--restart" in err, err
    assert state.read_bytes() == before and not (tmp_path / "o").exists()
    assert finetune.main([*common, "--restart"]) == 0
    log = json.loads((tmp_path / "o" / "npvlm_finetune.json").read_text())["log"]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert not (tmp_path / "o.work").exists()


def test_a_finished_run_removes_its_training_state_and_says_so(tmp_path, capfd):
    data = make_data(tmp_path / "d", n=4)
    assert run("--model", "demo", "--data", data, "--out", tmp_path / "o", "--steps", 3, "--batch-size", 2,
               "--save-every", 1) == 0
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"wrote {tmp_path / 'o'} (final loss") and \
        last.endswith(f"removed its training state from {tmp_path / 'o.work'}"), last
    assert not (tmp_path / "o.work").exists()


@pytest.mark.parametrize("golden", ["pg1_mqa_hub", "pg1_gqa_v5"])
def test_the_output_keeps_the_input_layout(tmp_path, golden):
    """Hub names in, hub names out (BF16, two shards + index); 5.x names in, 5.x names out (F32)."""
    from npvlm.saving.checkpoint import save_checkpoint
    source = GOLDENS / golden / "model"
    model = npvlm.load(source)
    save_checkpoint(model.params, source, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in source.iterdir())
    for f in source.glob("*.safetensors"):
        ours, theirs = read_safetensors(tmp_path / "out" / f.name), read_safetensors(f)
        assert set(ours) == set(theirs)
        assert stored_dtypes(tmp_path / "out" / f.name) == stored_dtypes(f)
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    if (source / "model.safetensors.index.json").is_file():
        a = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
        b = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
        assert a == b
    (tmp_path / "plain").write_text("")                 # every file gets the mode open() gives
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == \
        {p.name: plain for p in (tmp_path / "out").iterdir()}


def test_save_dtypes(tmp_path):
    data = make_data(tmp_path / "d", n=2)
    for dtype, want in (("same", "BF16"), ("float32", "F32"), ("bfloat16", "BF16")):
        run("--model", "demo", "--data", data, "--out", tmp_path / dtype, "--steps", 1, "--batch-size", 2,
            "--save-dtype", dtype)
        assert set(stored_dtypes(next((tmp_path / dtype).glob("*.safetensors"))).values()) == {want}, dtype


def test_lora_starts_at_the_base_model_and_is_merged_on_export(tmp_path):
    data = make_data(tmp_path / "d", n=4)
    model = npvlm.load("demo")
    batch = make_batch(model, read_jsonl(data))
    base, _ = loss_and_grads(batch, model.params, model.cfg, "attention")
    from npvlm.training.lora import add_lora
    model.params, names = add_lora(model.params, rank=4, alpha=8)
    assert "text.layers.0.mlp.down_proj" in names and "vision.layers.0.self_attn.q_proj" in names
    step0, grads = loss_and_grads(batch, model.params, model.cfg, "lora")
    assert step0 == base
    assert set(flatten(grads)) == {f"{n}.lora_{x}" for n in names for x in "AB"}
    run("--model", "demo", "--data", data, "--out", tmp_path / "lora", "--train", "lora", "--optimizer", "adamw",
        "--lr", 1e-2, "--steps", 3, "--batch-size", 4, "--lora-rank", 4, "--save-dtype", "float32")
    merged = params_of(tmp_path / "lora")
    before = params_of("demo")
    changed = {n for n in merged if not np.allclose(merged[n], before[n], atol=0)}
    assert changed and changed <= {f"{n}.weight" for n in names}


@pytest.mark.live
def test_transformers_loads_the_output_with_equal_logits(tmp_path, torch_and_transformers):
    torch, transformers = torch_and_transformers
    data = make_data(tmp_path / "d", n=4)
    run("--model", "demo", "--data", data, "--out", tmp_path / "o", "--train", "all", "--steps", 2,
        "--batch-size", 4, "--optimizer", "adamw", "--lr", 1e-3)
    ours = npvlm.load(tmp_path / "o")
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "o", attn_implementation="eager", dtype=torch.float32).eval()
    processor = transformers.PaliGemmaProcessor.from_pretrained(tmp_path / "o")     # copied from the demo
    assert np.array_equal(processor(images=make_scene(3).image, text="caption en", return_tensors="pt")["input_ids"].numpy(),
                          ours.processor([make_scene(3).image], ["caption en"])["input_ids"])
    inputs = ours.processor([make_scene(3).image], ["caption en"])
    logits = ours.prefill(inputs, logits_for="all")
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                 position_ids=torch.from_numpy(inputs["attention_mask"]).cumsum(-1)).logits.numpy()
    from npvlm.parity import compare
    r = compare("logits", logits, ref)
    print(r)
    assert r.ok


def test_the_command_runs_as_a_module(tmp_path):
    data = make_data(tmp_path / "d", n=2)
    r = subprocess.run([sys.executable, "-m", "npvlm.finetune", "--model", "demo", "--data", str(data),
                        "--out", str(tmp_path / "o"), "--steps", "1", "--batch-size", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "config.json").is_file() and "fine-tuning" in r.stderr


@pytest.mark.parametrize("command", ["npvlm.finetune", "npvlm.cli", "npvlm.evaluate"])
def test_help_shows_every_default(command):
    """Every option that has a default shows it in --help (argparse shows none for an option
    without help text)."""
    import importlib
    parser = importlib.import_module(command).build_parser()
    helped = parser.format_help()
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.default not in (None, False, "==SUPPRESS==") and not a.required
               and not isinstance(a, argparse._StoreFalseAction)
               and not (a.help and "%(default)" in parser._get_formatter()._get_help_string(a))]
    assert not missing, f"--help shows no default for {missing}"
    assert "(default: " in helped
