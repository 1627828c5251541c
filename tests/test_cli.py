"""`python run.py IMAGE PROMPT`: stdout carries only the answer, errors are one line + non-zero."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, write_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def assert_one_line_error(r, *fragments, code=None):
    assert r.returncode != 0, r.stdout
    if code is not None:
        assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert lines, "no message on stderr"
    assert "Traceback" not in r.stderr
    assert lines[-1].startswith("error:"), r.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]
    assert r.stdout == ""


def test_answer_on_stdout_only(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.count("\n") >= 1
    assert "loaded" in r.stderr           # progress goes to stderr


def test_json_output(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "tokens", "timings"}
    assert 1 <= len(out["tokens"]) <= 6
    t = out["timings"]
    assert {"load_s", "image_encode_s", "prefill_s", "decode_tokens_per_s"} <= set(t)


def test_stream_prints_the_same_text(model_dir, image):
    plain = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 10)
    streamed = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 10, "--stream")
    assert streamed.returncode == 0 and streamed.stdout == plain.stdout


def test_seed_makes_sampling_repeatable(model_dir, image):
    a = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 10, "--temperature", 1.5, "--seed", 3, "--json")
    b = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 10, "--temperature", 1.5, "--seed", 3, "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


@pytest.mark.parametrize("args, fragments", [
    (["--max-new-tokens", "0"], ["max-new-tokens"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "0"], ["top_p"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-k", "-2"], ["top_k"]),
    (["--max-new-tokens", "60"], ["exceeds the model's 64 positions"]),
])
def test_bad_options(model_dir, image, args, fragments):
    assert_one_line_error(run(image, "caption en", "--model", model_dir, *args), *fragments, code=1)


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "many"], "invalid int value"),
    (["--backend", "tpu"], "invalid choice"),
])
def test_unparseable_options(model_dir, image, args, fragment):
    assert_one_line_error(run(image, "caption en", "--model", model_dir, *args), fragment, code=2)


def test_cupy_without_gpu(model_dir, image):
    from npvlm.backend import cupy_usable
    if cupy_usable():
        pytest.skip("a GPU is usable here, so --backend cupy is not an error")
    assert_one_line_error(run(image, "caption en", "--model", model_dir, "--backend", "cupy"), "cupy")


def test_model_errors(tmp_path, model_dir, image):
    assert_one_line_error(run(image, "caption en", "--model", tmp_path / "nope"), "model folder not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(image, "caption en", "--model", tmp_path / "empty"), "config.json")
    no_tok = tmp_path / "no_tok"
    write_random_model(no_tok)
    (no_tok / "tokenizer.model").unlink()
    assert_one_line_error(run(image, "caption en", "--model", no_tok), "tokenizer.model")


def test_image_errors(tmp_path, model_dir):
    assert_one_line_error(run(tmp_path / "missing.png", "caption en", "--model", model_dir), "missing.png")
    assert_one_line_error(run(tmp_path, "caption en", "--model", model_dir))
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    assert_one_line_error(run(fake, "caption en", "--model", model_dir), "notes.png")


def test_debug_shows_traceback(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--max-new-tokens", "0", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


# ---- the installed command, Unix manners, notes on stderr ---------------------------------------

def test_command_and_module_print_what_run_py_prints(model_dir, image):
    """`npvlm` (console script), `python -m npvlm` and `python run.py`: one program."""
    import shutil
    args = [str(image), "caption en", "--model", str(model_dir), "--max-new-tokens", "6", "--json"]
    outs = [run(*args).stdout,
            subprocess.run([sys.executable, "-m", "npvlm", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120).stdout]
    exe = shutil.which("npvlm", path=str(Path(sys.executable).parent))
    assert exe, "the npvlm console script is not installed next to this python (pip install -e .)"
    outs.append(subprocess.run([exe, *args], capture_output=True, text=True, timeout=120).stdout)
    texts = [json.loads(o)["tokens"] for o in outs]
    assert texts[0] == texts[1] == texts[2]


def _shell(command):
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("pipe", ["--stream | head -c 3", "| head -0", "--json | head -c 1"])
def test_a_closed_pipe_ends_quietly(pipe):
    r = _shell(f"{sys.executable} run.py {pipe}; echo \"status ${{PIPESTATUS[0]}}\" >&2")
    assert "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] in ("status 0", "status 141"), r.stderr


def test_a_full_disk_is_one_error_line():
    r = _shell(f"{sys.executable} run.py > /dev/full")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "error: cannot write the answer to stdout (No space left on device)", r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


def test_demo_prompt_outside_its_tasks_is_noted():
    r = run(str(ROOT / "npvlm" / "demo" / "samples" / "scene.png"), "segment circle")
    assert r.returncode == 0
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: the demo model")]
    assert len(notes) == 1 and "'segment circle' is not one of them" in notes[0]
    assert not [line for line in run().stderr.splitlines() if line.startswith("note:")]   # caption en


def test_answer_cut_at_max_new_tokens_is_noted(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 3, "--json")
    if json.loads(r.stdout)["finish_reason"] == "length":
        assert "note: the answer was cut at --max-new-tokens 3" in r.stderr
    done = run(ROOT / "npvlm" / "demo" / "samples" / "scene.png", "caption en", "--max-new-tokens", 3)
    assert "note: the answer was cut at --max-new-tokens 3 before the model ended it" in done.stderr


def test_a_streamed_answer_ends_its_line_before_the_timing_line():
    """On a terminal stdout and stderr share one screen: the answer's newline comes before the
    timing line, not after it (one pipe for both shows the order they were written in)."""
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--stream"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    timing = next(i for i, line in enumerate(lines) if "image encode" in line)
    assert lines[timing].startswith("image encode"), lines[timing]
    assert lines[timing - 1] == "a green triangle, a yellow circle and a blue square", lines


def test_stream_with_json_is_refused(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--stream", "--json")
    assert_one_line_error(r, "--stream and --json cannot be combined", code=1)
    assert "loading" not in r.stderr


def test_max_new_tokens_that_cannot_fit_is_refused_before_loading(model_dir, image):
    r = run(image, "caption en", "--model", model_dir, "--max-new-tokens", 60)
    assert_one_line_error(r, "exceeds the model's 64 positions", code=1)
    assert "loading" not in r.stderr


def test_help_shows_defaults():
    r = run("--help")
    assert r.returncode == 0
    assert "(default: 64)" in r.stdout and "(default: demo)" in r.stdout and "(default: numpy)" in r.stdout
