"""Robustness, evaluation (`python -m npvlm.evaluate`, and fine-tuning's --keep-best): bad data
and options get one `error:` line with the documented exit code before the model is loaded, and
no --predictions file is written (the machinery: tests/robustness.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from robustness import FinetuneCase, run_evaluate_cli, run_finetune_cli


def _data(tmp, lines):
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(folder / "a.png")
    (folder / "test.jsonl").write_text("".join(json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "a b",
                                                           **x}) + "\n" for x in lines))
    return folder / "test.jsonl"


def _argv(tmp, base, data, *extra):
    return ["--model", str(base.model), "--data", str(data), "--predictions", str(tmp / "pred.jsonl"), *extra]


def _ev(lines, *extra):
    return lambda tmp, base: _argv(tmp, base, _data(tmp, lines), *extra)


def _predictions_is_data(tmp, base):
    data = _data(tmp, [{}])
    return ["--model", str(base.model), "--data", str(data), "--predictions", str(data)]


def _raw(tmp, line):
    path = _data(tmp, [])
    path.write_text(line + "\n")
    return path


def _predictions_is_image(tmp, base):
    data = _data(tmp, [{}])
    return ["--model", str(base.model), "--data", str(data), "--predictions", str(data.parent / "a.png")]


def _truncated_image(tmp, base):
    """A JPEG cut in half: its header reads, its pixels do not."""
    data = _data(tmp, [{}, {"image": "t.jpg"}])
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data.parent / "t.jpg", quality=90)
    whole = (data.parent / "t.jpg").read_bytes()
    (data.parent / "t.jpg").write_bytes(whole[:len(whole) // 2])
    return _argv(tmp, base, data)


def _predictions_in_model(tmp, base):
    return ["--model", str(base.model), "--data", str(_data(tmp, [{}])), "--predictions", str(base.model / "p.jsonl")]


def _mask_unreadable(tmp, base):
    data = _data(tmp, [{"prefix": "segment cat", "mask": "m.png"}])
    (data.parent / "m.png").write_text("not an image")
    return _argv(tmp, base, data, "--vae", str(ROOT / "tests" / "fixtures" / "vae" / "vae-tiny.npz"))


SEGS = "".join(f"<seg{i:03d}>" for i in range(16))
EVALUATE_CASES = [
    FinetuneCase("ev-data-missing", "the --data file does not exist",
                 lambda tmp, base: _argv(tmp, base, tmp / "nope.jsonl"), (1, "nope.jsonl: data file not found"),
                 "check the --data path"),
    FinetuneCase("ev-answers-not-list", "'answers' is a string, not a list", _ev([{}, {"prefix": "answer en why?", "answers": "yes"}]),
                 (1, "test.jsonl line 2: 'answers' must be a non-empty list of strings"), "give every answer in a list"),
    FinetuneCase("ev-references-empty", "'references' is an empty list", _ev([{"references": []}]),
                 (1, "test.jsonl line 1: 'references' must be a non-empty list of strings"), "give the references"),
    FinetuneCase("ev-detect-suffix-bad", "a detection suffix whose record is not a box",
                 _ev([{"prefix": "detect cat", "suffix": "<loc0100><loc0200> cat"}]),
                 (1, "test.jsonl line 1: the suffix's record '<loc0100><loc0200> cat' is not a box: 2 <loc> tokens"),
                 "write 4 <loc> tokens per object"),
    FinetuneCase("ev-box-bad", "'box_yxyx' with y1 < y0", _ev([{"prefix": "detect cat", "box_yxyx": [30, 0, 10, 20]}]),
                 (1, "test.jsonl line 1: 'box_yxyx' must be [y0, x0, y1, x1], finite numbers in pixels, with y1 > y0"),
                 "give the box as [y0, x0, y1, x1]"),
    FinetuneCase("ev-box-infinite", "'box_yxyx' holding Infinity (JSON's extension)",
                 lambda tmp, base: _argv(tmp, base, _raw(tmp, '{"image": "a.png", "prefix": "detect cat", '
                                                             '"suffix": "x", "box_yxyx": [0, 0, Infinity, 5]}')),
                 (1, "test.jsonl line 1: 'box_yxyx' must be [y0, x0, y1, x1], finite numbers"),
                 "give the box as [y0, x0, y1, x1]"),
    FinetuneCase("ev-task-unknown", "a line's own 'task' that is not a task", _ev([{"task": "bleu"}]),
                 (1, "test.jsonl line 1: 'task' must be one of vqa, anls"), "name one of the tasks"),
    FinetuneCase("ev-predictions-is-image", "--predictions is one of the lines' images", _predictions_is_image,
                 (1, "a.png: refusing to overwrite the input file"), "write the predictions elsewhere"),
    FinetuneCase("ev-refexp-no-box", "a referring expression (--task refexp) with no box anywhere",
                 _ev([{"prefix": "detect cat"}], "--task", "refexp"),
                 (1, "test.jsonl line 1: a referring expression needs 'box_yxyx' or a box in the suffix"),
                 "add box_yxyx"),
    FinetuneCase("ev-segment-no-vae", "segment lines without --vae",
                 _ev([{"prefix": "segment cat", "suffix": f"<loc0100><loc0200><loc0700><loc0800>{SEGS} cat"}]),
                 (1, "the segment task needs the VQ-VAE mask decoder: pass --vae vae-oid.npz"), "pass --vae"),
    FinetuneCase("ev-mask-unreadable", "a segment line's 'mask' is not an image", _mask_unreadable,
                 (1, "test.jsonl line 1: mask 'm.png' cannot be read"), "point 'mask' at the PNG"),
    FinetuneCase("ev-image-truncated", "an image cut short after its header (a broken download)", _truncated_image,
                 (1, "t.jpg: truncated or corrupt image"), "download the image again"),
    FinetuneCase("ev-over-positions", "a prompt + --max-new-tokens beyond the model's positions (64 in the test model)",
                 _ev([{}], "--max-new-tokens", "100"),
                 (1, "test.jsonl line 1: the prompt ("), "lower --max-new-tokens"),
    FinetuneCase("ev-unknown-task", "an unknown --task", _ev([{}], "--task", "bleu"),
                 (2, "argument --task: invalid choice: 'bleu'"), "choose one of --help's tasks"),
    FinetuneCase("ev-batch-zero", "--batch-size 0", _ev([{}], "--batch-size", "0"),
                 (1, "--batch-size must be >= 1, got 0"), "give a positive batch size"),
    FinetuneCase("ev-predictions-is-data", "--predictions is the --data file", _predictions_is_data,
                 (1, "refusing to overwrite the input file"), "write the predictions elsewhere"),
    FinetuneCase("ev-predictions-in-model", "--predictions inside the model folder", _predictions_in_model,
                 (1, "is inside the model folder"), "write the predictions elsewhere"),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=lambda c: c.id)
def test_evaluate_bad_input(case, robust_base, tmp_path):
    """One `error:` line, the documented exit code, no traceback, no predictions written, and the
    model never loaded (every line is checked first)."""
    argv = case.build(tmp_path, robust_base)
    predictions = tmp_path / "pred.jsonl"
    images = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    r = run_evaluate_cli(argv, tmp_path)
    code, fragment = case.error
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.last_line.startswith("error:") and fragment in r.last_line, r.stderr
    assert "loading" not in r.stderr, "the model was loaded before the input was checked"
    assert not predictions.exists() and not list(tmp_path.rglob(".*.tmp")), "a predictions file was written"
    assert all(p.read_bytes() == b for p, b in images.items()), "an input image changed"


def test_keep_best_names_a_score_of_the_run(robust_base, tmp_path):
    data = _data(tmp_path, [{}])
    argv = ["--model", str(robust_base.model), "--data", str(data), "--val", str(data), "--out", str(tmp_path / "o"),
            "--steps", "1", "--keep-best", "vqa.accuracy"]
    r = run_finetune_cli(argv, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.last_line == ("error: --keep-best 'vqa.accuracy' is not a validation score of this run; choose one of "
                           "val_loss, caption.cider, caption.bleu4")
    r = run_finetune_cli([*argv[:argv.index("--val")], *argv[argv.index("--out"):]], tmp_path)
    assert r.last_line == "error: --keep-best needs validation examples (--val)"


def test_finetune_val_with_segment_lines_names_both_ways_out(robust_base, tmp_path):
    segs = "".join(f"<seg{i:03d}>" for i in range(16))
    data = _data(tmp_path, [{"prefix": "segment cat", "suffix": f"<loc0100><loc0200><loc0700><loc0800>{segs} cat"}])
    argv = ["--model", str(robust_base.model), "--data", str(data), "--val", str(data), "--out", str(tmp_path / "o"),
            "--steps", "1"]
    r = run_finetune_cli(argv, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.last_line.endswith("needs the VQ-VAE mask decoder: pass --vae vae-oid.npz, or --no-val-metric to "
                                "report the validation loss only")
