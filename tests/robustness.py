"""The robustness tables' machinery (the tables: tests/test_robustness_*.py): every bad input
gets a clear one-line error, nothing is lost, nothing is trusted.

A table is a list of `Case`s; each case builds its input in a temporary folder and is run twice,

- through the Python API (`npvlm.load(...).generate(...)`, `npvlm.inputs.image.load_image`,
  `npvlm.saving.atomic`): the documented exception type from `npvlm.errors`, its one-line message
  checked (`check_api`);
- through `python run.py` in a subprocess: the last stderr line starts with `error:` and holds a
  specific fragment, the exit code is the documented one, stdout is empty, no "Traceback"
  (`check_cli`; `run_cli_cases` runs a table's cases a few at a time).

Cases that must work (a 1x1 image, an empty prompt, ...) check that both paths give an answer.
The fine-tuning and evaluation commands have their own tables of `FinetuneCase`s
(tests/test_robustness_finetune.py, tests/test_robustness_evaluate.py).
docs/errors.md is generated from the tables: `python tests/make_errors_doc.py`.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npvlm
from npvlm.errors import NpvlmError
from npvlm.inputs.image import load_image
from npvlm.saving.atomic import check_writable, image_format, save_image_atomic

from helpers import ROOT, write_random_model

RUN_PY = ROOT / "run.py"
MARKER = "EXECUTED"        # a pickle in these cases creates this file if anything unpickles it

# the tables' groups, in the order docs/errors.md lists them
MODEL, CODE, IMAGE, PROMPT, OUTPUT = ("Model folder", "Never executing code from the model folder", "Image",
                                      "Prompt and options", "Output")
FT = "Fine-tuning data and options (python -m npvlm.finetune)"
EV = "Evaluation data and options (python -m npvlm.evaluate)"


@dataclass
class Inputs:
    """What one case hands to the API and to run.py (each runner gets a fresh copy)."""
    model: object                      # model folder (or a path that is not one)
    image: object
    prompt: str = "caption en"
    cli_prompt: object = None          # argv form when it must differ (bytes that are not UTF-8)
    api_kwargs: dict = field(default_factory=dict)   # extra model.generate(...) arguments
    cli_args: list = field(default_factory=list)     # extra run.py arguments
    backend: str = "numpy"
    weights: str = "fp32"              # --weights / npvlm.load(weights=...)
    draw: Path = None                  # --draw OUT / npvlm.saving.atomic.save_image_atomic
    allow_huge: bool = False           # --allow-huge-image / load_image(allow_huge=True)
    vae: Path = None                   # --vae FILE / npvlm.tasks.segmentation.load_vae
    pillow_limit: int = None           # lower PIL.Image.MAX_IMAGE_PIXELS for this run
    check: object = None               # check(inputs, tmp) after the run: nothing lost or run


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    what: str                          # the case in words (the doc's first column)
    build: object                      # build(tmp, base) -> Inputs
    api: tuple                         # (exception type, fragment), or None: it works
    cli: tuple                         # (exit code, fragment); (0, None): it works
    todo: str = ""                     # what a user should do (the doc's last column)
    before_load: bool = False          # run.py must refuse before loading the model
    needs_no_gpu: bool = False         # only an error where CuPy cannot run


@dataclass
class Base:
    """A valid tiny model and image, made once; cases copy what they change."""
    model: Path
    image: Path


def make_base(folder):
    folder = Path(folder)
    model = write_random_model(folder / "model")
    image = folder / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    return Base(model, image)



@dataclass(frozen=True)
class FinetuneCase:
    id: str
    what: str
    build: object                      # build(tmp, base) -> argv for npvlm.finetune (no --quiet)
    error: tuple                       # (exit code, fragment)
    todo: str



def run_api(inp):
    """The Python API, the way a user calls it. Returns the Generation (or raises)."""
    with pytest.MonkeyPatch.context() as mp:
        if inp.pillow_limit is not None:
            mp.setattr(Image, "MAX_IMAGE_PIXELS", inp.pillow_limit)
        if inp.draw is not None:
            check_writable(inp.draw, inputs=[inp.image])
            image_format(inp.draw)
        if inp.vae is not None:
            from npvlm.tasks.segmentation import load_vae
            load_vae(inp.vae)
        model = npvlm.load(inp.model, backend=inp.backend, weights=inp.weights)
        image = load_image(inp.image, allow_huge=True) if inp.allow_huge else inp.image
        out = model.generate(image, inp.prompt, **{"max_new_tokens": 2, **inp.api_kwargs})
        if inp.draw is not None:
            from npvlm.tasks.draw import draw_objects
            save_image_atomic(draw_objects(load_image(inp.image), out.detections().objects), inp.draw)
        return out


def cli_argv(inp):
    argv = [str(inp.image), inp.cli_prompt if inp.cli_prompt is not None else inp.prompt,
            "--model", str(inp.model), "--max-new-tokens", "2", "--backend", inp.backend,
            "--weights", inp.weights,
            *inp.cli_args]
    if inp.draw is not None:
        argv += ["--draw", str(inp.draw)]
    if inp.vae is not None:
        argv += ["--vae", str(inp.vae)]
    if inp.pillow_limit is None:
        return [sys.executable, str(RUN_PY), *argv]
    # run.py itself, in a fresh interpreter whose Pillow limit is lowered first (no test hook)
    boot = ("import runpy, sys, PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = int(sys.argv.pop(1)); "
            f"sys.argv[0] = {str(RUN_PY)!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", boot, str(inp.pillow_limit), *argv]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self):
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def run_cli(inp, cwd):
    r = subprocess.run(cli_argv(inp), capture_output=True, cwd=cwd, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return CliResult(r.returncode, r.stdout.decode("utf-8", "replace"),
                     r.stderr.decode("utf-8", "replace"))


def skip_reason(case):
    if case.needs_no_gpu:
        from npvlm.backend import cupy_usable
        if cupy_usable():
            return "a GPU is usable here, so the cupy backend is not an error"
    return None


def run_evaluate_cli(argv, cwd):
    r = subprocess.run([sys.executable, "-m", "npvlm.evaluate", *argv, "--quiet"], capture_output=True, cwd=cwd,
                       timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return CliResult(r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


def run_finetune_cli(argv, cwd):
    r = subprocess.run([sys.executable, "-m", "npvlm.finetune", *argv, "--quiet"], capture_output=True, cwd=cwd,
                       timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    return CliResult(r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


def check_api(case, base, tmp):
    """Run a case through the API: an answer where it must work, else the documented exception
    with a one-line message holding the fragment; then the case's own check."""
    inp = case.build(tmp, base)
    if case.api is None:
        out = run_api(inp)
        assert isinstance(out.text, str) and 1 <= len(out.tokens) <= 2
    else:
        kind, fragment = case.api
        with pytest.raises(NpvlmError) as info:
            run_api(inp)
        assert type(info.value) is kind, f"{type(info.value).__name__}: {info.value}"
        msg = str(info.value)
        assert "\n" not in msg and fragment in msg, msg
    if inp.check is not None:
        inp.check(inp, tmp)


def run_cli_cases(cases, base, root):
    """run.py for each case, a few subprocesses at a time (each is ~0.3 s of imports):
    {case id: (inputs, its folder, CliResult)}."""
    def one(case):
        tmp = root / case.id
        tmp.mkdir()
        inp = case.build(tmp, base)
        return case.id, (inp, tmp, run_cli(inp, tmp))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, [c for c in cases if skip_reason(c) is None]))


def check_cli(case, result):
    """run.py's answer, or its one `error:` line with the fragment, the exit code, nothing on
    stdout, no traceback, and (before_load) no loading before the refusal."""
    inp, tmp, r = result
    code, fragment = case.cli
    assert "Traceback" not in r.stderr, r.stderr
    if code == 0:
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n"), r.stderr
        assert not any(line.startswith(("error", "internal error")) for line in r.stderr.splitlines())
    else:
        assert r.returncode == code, (r.returncode, r.stderr)
        assert r.stdout == ""
        assert r.last_line.startswith("error:") and fragment in r.last_line, r.stderr
        if case.before_load:
            assert "loading" not in r.stderr, "the model was loaded before the input was refused"
    if inp.check is not None:
        inp.check(inp, tmp)
