"""Robustness, prompts, options and outputs: bad prompts, generation options, backends, weight
modes and --draw paths get one line (before the model is loaded where that is possible), and an
output is written whole or not at all (the machinery: tests/robustness.py)."""

import pytest
from PIL import Image

from npvlm.errors import BackendError, InputError
from npvlm.saving.atomic import save_image_atomic

from robustness import OUTPUT, PROMPT, Case, Inputs, check_api, check_cli, skip_reason

POSITIONS = "exceeds the model's 64 positions"


# ---- builders: prompts and options --------------------------------------------------------------

def options_case(**fields):
    def build(tmp, base):
        return Inputs(base.model, base.image, **fields)
    return build


# ---- builders: outputs ---------------------------------------------------------------------------

def draw_case(where):
    def build(tmp, base):
        return Inputs(base.model, base.image, draw=where(tmp, base))
    return build


def _under_a_file(tmp, base):
    (tmp / "results").write_text("I am a file, not a folder")
    return tmp / "results" / "out.png"


def _folder_as_output(tmp, base):
    (tmp / "out.png").mkdir()
    return tmp / "out.png"


def _replaces_existing(tmp, base):
    """--draw onto an unrelated existing file: replaced whole, by a rename, no temp file left."""
    out = tmp / "out.png"
    out.write_bytes(b"old contents " * 50_000)
    reference = tmp / "reference.txt"          # what a plain open() makes here (umask applied)
    reference.write_text("x")
    old_inode = out.stat().st_ino

    def check(inp, tmp):
        assert [p.name for p in tmp.iterdir() if p.name.endswith(".tmp")] == []
        assert out.stat().st_ino != old_inode, "the old file was rewritten in place, not replaced"
        with Image.open(out) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 40
        assert out.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    return Inputs(base.model, base.image, draw=out, check=check)


CASES = [
    # -- prompt and options
    Case("prompt-empty", PROMPT, "empty prompt (allowed, as in HF)", options_case(prompt=""),
         None, (0, None)),
    Case("prompt-too-long", PROMPT, "prompt + max_new_tokens longer than the model's positions",
         options_case(prompt="describe " * 40, api_kwargs=dict(max_new_tokens=30),
                      cli_args=["--max-new-tokens", "30"]),
         (InputError, POSITIONS), (1, POSITIONS), "shorten the prompt or lower max_new_tokens"),
    Case("prompt-not-utf8", PROMPT, "prompt that is not UTF-8 (CLI: argv bytes `caption \\xff`; "
         "API: a str with the lone surrogate `\\udcff`)",
         options_case(prompt="caption \udcff", cli_prompt=b"caption \xff"),
         (InputError, "is not valid UTF-8 text: it holds a lone surrogate"),
         (1, "the prompt is not valid UTF-8 text (byte 0xff at character 8)"),
         "pass UTF-8 text", before_load=True),
    Case("max-new-tokens-0", PROMPT, "max_new_tokens 0",
         options_case(api_kwargs=dict(max_new_tokens=0), cli_args=["--max-new-tokens", "0"]),
         (InputError, "max_new_tokens must be an integer >= 1, got 0"),
         (1, "--max-new-tokens must be >= 1, got 0"), "ask for at least 1 token", before_load=True),
    Case("max-new-tokens-negative", PROMPT, "max_new_tokens -5",
         options_case(api_kwargs=dict(max_new_tokens=-5), cli_args=["--max-new-tokens", "-5"]),
         (InputError, "max_new_tokens must be an integer >= 1, got -5"),
         (1, "--max-new-tokens must be >= 1, got -5"), "ask for at least 1 token", before_load=True),
    Case("max-new-tokens-not-a-number", PROMPT, "max_new_tokens not a number",
         options_case(api_kwargs=dict(max_new_tokens="many"), cli_args=["--max-new-tokens", "many"]),
         (InputError, "max_new_tokens must be an integer >= 1, got 'many'"),
         (2, "argument --max-new-tokens: invalid int value: 'many'"), "pass an integer",
         before_load=True),
    Case("temperature-negative", PROMPT, "temperature < 0",
         options_case(api_kwargs=dict(temperature=-0.5), cli_args=["--temperature", "-0.5"]),
         (InputError, "temperature must be a number >= 0"), (1, "temperature must be a number >= 0"),
         "use 0 (greedy) or a positive temperature", before_load=True),
    Case("top-p-zero", PROMPT, "top_p 0",
         options_case(api_kwargs=dict(top_p=0.0), cli_args=["--top-p", "0"]),
         (InputError, "top_p must be in (0, 1]"), (1, "top_p must be in (0, 1]"),
         "use a value in (0, 1]; 1 turns it off", before_load=True),
    Case("top-p-above-1", PROMPT, "top_p 1.5",
         options_case(api_kwargs=dict(top_p=1.5), cli_args=["--top-p", "1.5"]),
         (InputError, "top_p must be in (0, 1] (1 = off), got 1.5"), (1, "top_p must be in (0, 1] (1 = off), got 1.5"),
         "use a value in (0, 1]; 1 turns it off", before_load=True),
    Case("top-k-negative", PROMPT, "top_k < 0",
         options_case(api_kwargs=dict(top_k=-2), cli_args=["--top-k", "-2"]),
         (InputError, "top_k must be an integer >= 0"), (1, "top_k must be an integer >= 0"),
         "use 0 (off) or a positive k", before_load=True),
    Case("backend-unknown", PROMPT, "unknown backend", options_case(backend="tpu"),
         (BackendError, "unknown backend 'tpu'; choose one of: numpy, cupy"),
         (2, "argument --backend: invalid choice: 'tpu'"), "use numpy or cupy", before_load=True),
    Case("backend-cupy-no-gpu", PROMPT, "backend cupy without a usable GPU (or without cupy)",
         options_case(backend="cupy"), (BackendError, "backend 'cupy' is not usable"),
         (1, "backend 'cupy' is not usable"), "use --backend numpy, or install cupy on a GPU "
                                               "machine", needs_no_gpu=True),
    Case("weights-unknown", PROMPT, "unknown weight storage", options_case(weights="int8"),
         (InputError, "weights must be one of fp32, bf16, not 'int8'"),
         (2, "argument --weights: invalid choice: 'int8'"), "use fp32 (default) or bf16", before_load=True),
    Case("weights-bf16-on-cupy", PROMPT, "bf16 weights with the cupy backend",
         options_case(backend="cupy", weights="bf16"),
         (InputError, 'weights="bf16" is a CPU memory saving for the numpy backend'),
         (1, 'weights="bf16" is a CPU memory saving for the numpy backend'),
         "use the default fp32 weights on a GPU", before_load=True),
    Case("weights-bf16-works", PROMPT, "bf16 weights on the numpy backend (not an error)",
         options_case(weights="bf16"), None, (0, None)),
    # -- output
    Case("draw-missing-folder", OUTPUT, "--draw into a folder that does not exist",
         draw_case(lambda tmp, base: tmp / "nope" / "out.png"),
         (InputError, "does not exist; create it"), (1, "does not exist"),
         "create the folder first", before_load=True),
    Case("draw-under-a-file", OUTPUT, "--draw into a path under a file (`results/out.png`, "
         "results a file; also how the tests stand in for a read-only folder, since root ignores "
         "chmod)", draw_case(_under_a_file),
         (InputError, "is a file, not a folder"), (1, "is a file, not a folder"),
         "choose a path in an existing, writable folder", before_load=True),
    Case("draw-is-a-folder", OUTPUT, "--draw names an existing folder",
         draw_case(_folder_as_output), (InputError, "is a folder; give a file name"),
         (1, "is a folder"), "give a file name such as out.png", before_load=True),
    Case("draw-onto-input", OUTPUT, "--draw onto the input image itself",
         draw_case(lambda tmp, base: base.image),
         (InputError, "refusing to overwrite the input file"), (1, "refusing to overwrite the input"),
         "choose another output path", before_load=True),
    Case("draw-unknown-extension", OUTPUT, "--draw with an extension Pillow cannot write",
         draw_case(lambda tmp, base: tmp / "out.xyz"),
         (InputError, "unknown image extension '.xyz'"), (1, "unknown image extension"),
         "use .png or .jpg", before_load=True),
    Case("draw-replaces-existing", OUTPUT, "--draw onto an existing unrelated file: replaced whole "
         "(temp file + rename), no temp file left, normal permissions", _replaces_existing,
         None, (0, None)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api(case, robust_base, tmp_path):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_api(case, robust_base, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli(case, cli_results):
    if skip_reason(case):
        pytest.skip(skip_reason(case))
    check_cli(case, cli_results[case.id])


def test_failed_write_keeps_the_old_file(tmp_path):
    """A write that fails half-way (a full disk) leaves the previous output intact and no temp file."""
    out = tmp_path / "out.png"
    out.write_bytes(b"previous result")

    class FailingImage:
        def save(self, f, format):
            f.write(b"\x89PNG partial")
            raise OSError(28, "No space left on device")
    with pytest.raises(InputError, match="No space left on device.*previous file there is unchanged"):
        save_image_atomic(FailingImage(), out)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
