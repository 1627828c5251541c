"""Robustness, fine-tuning (`python -m npvlm.finetune`): bad data and options get one `error:`
line with the documented exit code, and nothing is written to --out (the machinery:
tests/robustness.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npvlm import finetune

from robustness import FinetuneCase, run_finetune_cli


def _ft_data(tmp, lines, images=("a.png",)):
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    for name in images:
        Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(folder / name)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _ft_argv(tmp, base, data, *extra):
    return ["--model", str(base.model), "--data", str(data), "--out", str(tmp / "out"), "--steps", "2",
            "--batch-size", "1", *extra]


def _example(image="a.png", prefix="caption en", suffix="a b"):
    return json.dumps({"image": image, "prefix": prefix, "suffix": suffix})


def _ft(lines, *extra, images=("a.png",)):
    return lambda tmp, base: _ft_argv(tmp, base, _ft_data(tmp, lines, images), *extra)


def _ft_text_image(tmp, base):
    data = _ft_data(tmp, [_example(), _example("notes.png")])
    (data.parent / "notes.png").write_text("not an image")
    return _ft_argv(tmp, base, data)


def _ft_out_is_input(tmp, base):
    return ["--model", str(base.model), "--data", str(_ft_data(tmp, [_example()])), "--out", str(base.model)]


def _saved_state(damage=None, *extra):
    """A run stopped after step 1 with its state saved in OUT.work, then damage(work) done to it;
    the argv runs the same command again with `extra`."""
    def build(tmp, base):
        argv = _ft_argv(tmp, base, _ft_data(tmp, [_example()]))
        assert finetune.run(finetune.parse_args([*argv, "--quiet"]), on_step=lambda entry: True) == 0
        if damage is not None:
            damage(tmp / "out.work")
        return [*argv, *extra]
    return build


def _truncate_npz(work):
    data = (work / "state.npz").read_bytes()
    (work / "state.npz").write_bytes(data[:len(data) // 2])


def _ft_out_not_empty(tmp, base):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return _ft_argv(tmp, base, _ft_data(tmp, [_example()]))


FINETUNE_CASES = [
    FinetuneCase("ft-data-missing", "the --data file does not exist",
                 lambda tmp, base: _ft_argv(tmp, base, tmp / "nope.jsonl"), (1, "nope.jsonl: data file not found"),
                 "check the --data path"),
    FinetuneCase("ft-not-json", "a line that is not JSON", _ft([_example(), "{image: a.png"]),
                 (1, "train.jsonl line 2: not valid JSON"), "fix that line"),
    FinetuneCase("ft-image-missing", "an example's image file does not exist", _ft([_example(), _example("b.png")]),
                 (1, "train.jsonl line 2: image 'b.png' not found"), "paths are relative to the JSONL file"),
    FinetuneCase("ft-image-unreadable", "an example's image is not an image (a text file named .png)",
                 _ft_text_image, (1, "train.jsonl line 2: image 'notes.png' cannot be read"), "replace the file"),
    FinetuneCase("ft-suffix-empty", "an empty suffix", _ft([_example(suffix="  ")]),
                 (1, "train.jsonl line 1: 'suffix' is empty"), "give every example its answer"),
    FinetuneCase("ft-suffix-missing", "no suffix", _ft([json.dumps({"image": "a.png", "prefix": "caption en"})]),
                 (1, "train.jsonl line 1: 'suffix' is missing or not a string"), "give every example its answer"),
    FinetuneCase("ft-too-long", "an example longer than --max-len text tokens",
                 _ft([_example(suffix="a b c d e f g h")], "--max-len", "5"),
                 (1, "train.jsonl line 1: the example is"), "shorten it or raise --max-len"),
    FinetuneCase("ft-over-positions", "an example longer than the model's positions (64 in the test model)",
                 _ft([_example(suffix=" ".join(["word"] * 80))], "--max-len", "1000"),
                 (1, "exceed the model's 64 positions"), "shorten the example"),
    FinetuneCase("ft-unknown-train", "an unknown --train value", _ft([_example()], "--train", "mlp"),
                 (2, "argument --train: invalid choice: 'mlp'"), "choose all, decoder, attention or lora"),
    FinetuneCase("ft-nan-loss", "a learning rate so large the loss overflows (NaN/inf)",
                 _ft([_example()], "--optimizer", "sgd", "--lr", "1e30", "--warmup-steps", "0", "--steps", "3"),
                 (1, "step 2: the loss is"), "lower --lr, or set --clip-norm"),
    FinetuneCase("ft-out-is-input", "--out is the input model's folder", _ft_out_is_input,
                 (1, "is the input model's folder"), "write the fine-tuned model elsewhere"),
    FinetuneCase("ft-out-not-empty", "--out is a folder that already holds files", _ft_out_not_empty,
                 (1, "already exists and is not an empty folder"), "choose a new output folder"),
    FinetuneCase("ft-resume-nothing", "--resume with no saved state", _ft([_example()], "--resume"),
                 (1, "no saved training state to resume"), "drop --resume, or point --work at the state"),
    FinetuneCase("ft-state-exists", "the same command again while OUT.work holds a saved state (no --resume)",
                 _saved_state(), (1, "holds the saved state of a run at step 1; continue it with --resume, or "
                                     "discard it and start over with --restart"),
                 "--resume to continue it, --restart to discard it"),
    FinetuneCase("ft-resume-and-restart", "--resume with --restart", _ft([_example()], "--resume", "--restart"),
                 (1, "--resume and --restart cannot be combined"), "choose one"),
    FinetuneCase("ft-state-truncated", "--resume from a truncated state.npz (a crash or a full disk)",
                 _saved_state(_truncate_npz, "--resume"),
                 (1, "state.npz: the saved training state is damaged or incomplete"), "start over with --restart"),
    FinetuneCase("ft-state-json-garbled", "--resume from a state.json that is not JSON",
                 _saved_state(lambda work: (work / "state.json").write_text("{step: 1"), "--resume"),
                 (1, "state.json: the saved training state is damaged (JSONDecodeError)"), "start over with --restart"),
    FinetuneCase("ft-state-npz-missing", "--resume with state.npz deleted",
                 _saved_state(lambda work: (work / "state.npz").unlink(), "--resume"),
                 (1, "state.npz: the saved training state is missing"), "start over with --restart"),
    FinetuneCase("ft-state-json-missing", "--resume with state.json deleted (state.npz left)",
                 _saved_state(lambda work: (work / "state.json").unlink(), "--resume"),
                 (1, "the saved training state is incomplete"), "start over with --restart"),
]


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=lambda c: c.id)
def test_finetune_bad_input(case, robust_base, tmp_path):
    """One `error:` line, the documented exit code, no traceback, and nothing written to --out
    (what was there before stays as it was)."""
    argv = case.build(tmp_path, robust_base)
    out = Path(argv[argv.index("--out") + 1])           # the input model itself, in ft-out-is-input

    def listing():
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()) if out.is_dir() else None
    before = listing()
    r = run_finetune_cli(argv, tmp_path)
    code, fragment = case.error
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.last_line.startswith("error:") and fragment in r.last_line, r.stderr
    assert listing() == before, "the output folder changed"
    assert not list(out.parent.glob(f".{out.name}.*.tmp")), "a temporary output folder was left behind"
