"""`python run.py IMAGE PROMPT`: stdout carries only the answer, errors are one line + non-zero."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from helpers import write_random_model


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
