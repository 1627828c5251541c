"""Regenerate docs/errors.md by running every case of the robustness tables (tests/robustness.py).

    python tests/make_errors_doc.py               # writes docs/errors.md
    python tests/make_errors_doc.py --out -       # prints it

Every message in the doc is what the API raised and what run.py printed on this machine, with
the temporary folder removed from paths. Needs the test extra (pytest): pip install -e '.[test]'.
Takes a few seconds (one run.py subprocess per case).
"""

import argparse
import ast
import sys
import tempfile
from pathlib import Path

from npvlm.errors import NpvlmError

import robustness as T  # this folder: the tables' machinery
import test_robustness_evaluate
import test_robustness_finetune
import test_robustness_images
import test_robustness_models
import test_robustness_options

# every case, in the order of the doc's sections (groups in order of first appearance)
CASES = test_robustness_models.CASES + test_robustness_images.CASES + test_robustness_options.CASES
FINETUNE_CASES = test_robustness_finetune.FINETUNE_CASES
EVALUATE_CASES = test_robustness_evaluate.EVALUATE_CASES

ROOT = Path(__file__).resolve().parent.parent

HEADER = """\
# Errors: what npvlm says about bad input, and what to do

Every problem a user can cause ends in one line. The Python API raises one of the exceptions in
`npvlm.errors` (all subclasses of `NpvlmError`; `ConfigError`, `CheckpointError` and
`InputError` are also `ValueError`s, `BackendError` a `RuntimeError`). `run.py` prints that
message as its last stderr line, prefixed with `error:`, prints nothing on stdout, and exits
with 1 (2 when argparse rejects an option before npvlm runs). No traceback is shown unless you
pass `--debug`. Anything else (`internal error (SomeType): ...`) is a bug: please report it with
the `--debug` output.

**Generated file.** The messages below were produced by running each case of
the robustness tables (`tests/test_robustness_*.py`) through the API and through `run.py`
(`python tests/make_errors_doc.py`); paths are shown relative to the case's temporary folder.
The tests check a fragment of each message (and that every case is listed here); rerun the
tool after changing a message or adding a case.

Columns: **API** is the exception and message of `npvlm.load(folder).generate(image, prompt,
...)` (plus `npvlm.inputs.image.load_image` and `npvlm.saving.atomic` for `allow_huge` and drawing); **run.py** is
the last stderr line of `python run.py IMAGE PROMPT --model DIR ...`; **exit** its exit status.
"Before load" means run.py refuses before it reads the model, so a mistake costs no loading time.
"""

FOOTER = """
## Why only safetensors

npvlm reads weights from `.safetensors` files only, with the `safetensors` package
(`npvlm/loading/safetensors_file.py`): an 8-byte length, a JSON header, raw little-endian numbers. Nothing
in such a file can run code, and every header is checked (length, JSON, offsets that tile the
data exactly, by the package; float dtypes, shapes against config.json, by npvlm) before a byte
of tensor data is read.

- **No pickle.** `pytorch_model.bin`, `*.pt`, `*.pth` and `*.ckpt` files are PyTorch pickles;
  unpickling one can execute arbitrary code (that is how pickle rebuilds objects), so npvlm never
  opens them, not even when they sit next to valid safetensors. A model folder whose weights are
  only pickles is refused with a message that names them and says to convert them (without
  config.json it is refused for that first). The tests put a pickle that
  would create a file when unpickled into the folder (as `pytorch_model.bin`, renamed to
  `model.safetensors` and renamed to `tokenizer.model`) and check the file is never created.
- **No remote code.** `config.json` is read as data into fixed fields; keys such as `auto_map`
  and `trust_remote_code` are ignored, and no Python file in the model folder is ever imported.
  The PaliGemma architecture is implemented here, so there is nothing to trust.
- **The VQ-VAE for `segment` answers** (`run.py --vae vae-oid.npz`,
  `npvlm.tasks.segmentation.load_vae`) is read with `np.load(..., allow_pickle=False)` after checking
  that the file is a zip archive, so neither a pickle renamed `.npz` nor an `.npz` holding
  pickled object arrays is ever unpickled.
- **The tokenizer is data too.** `tokenizer.model` is parsed by SentencePiece as a protobuf
  (`SentencePieceProcessor(model_proto=...)`); `tokenizer_config.json`, `tokenizer.json` and any
  `tokenization_*.py` are not read.
- **Images**: Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89.5 M
  pixels) is kept; a file over it is refused from its header alone, before any pixels are
  decoded. Lift it per call for a file you trust: `--allow-huge-image` or
  `npvlm.inputs.image.load_image(path, allow_huge=True)`.

## Atomic outputs: nothing is lost

Files that npvlm writes (`run.py --draw OUT.png`, `npvlm.saving.atomic.save_image_atomic`,
`write_text_atomic`) are written to a temporary file in the same folder
(`.OUT.png.<random>.tmp`), flushed to disk, then renamed over the destination in one step
(`os.replace`). So:

- a crash, Ctrl-C or a full disk never leaves a half-written output, and never truncates the file
  that was there before: it is either the old file or the complete new one (a failed write
  raises `InputError: OUT: cannot write (...); any previous file there is unchanged` and removes
  the temporary file);
- an existing unrelated file at the output path is replaced whole (a new file, not rewritten in
  place), with the permissions a plain `open()` would give (the umask applies);
- the output path is checked before any work (see the Output table): a missing folder, a path
  under a file, an existing folder, an unknown extension, or the input image itself are refused
  before the model is loaded.

The tests run as root, where `chmod`-based read-only folders do not stop writes, so the
"cannot write here" case is tested with a path under a file (`results/out.png`, where `results`
is a file) and with a missing folder. For a read-only folder as a normal user the message is
`OUT: folder DIR is not writable; choose another folder` (exit 1, before load).
"""


ERROR_TYPES = ("NpvlmError", "ConfigError", "CheckpointError", "InputError", "BackendError")


def _template(node):
    """The text of a message expression with its computed parts as "…": an f-string, a string
    constant, or a + of them; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return None if left is None or right is None else left + right
    return "…" if isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) else None


def message_templates():
    """Every message npvlm can raise: [(module, function, template)] for each npvlm error type
    constructed in npvlm/ (raised there or returned to be raised), computed parts shown as "…"."""
    out = []
    package = ROOT / "npvlm"
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERROR_TYPES \
                    and node.args:
                text = _template(node.args[0])
                if text is None:
                    continue
                owner = min((f for f in functions if f.lineno <= node.lineno <= f.end_lineno),
                            key=lambda f: f.end_lineno - f.lineno, default=None)
                module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                out.append((module, node.lineno, owner.name if owner else "", f"{node.func.id}: {text}"))
    return [(module, function, text) for module, _, function, text in sorted(out)]


def messages_section():
    lines = ["\n## Every message, by module\n",
             "The messages npvlm's code can raise, read from the code (`message_templates`): `…` stands "
             "for what is filled in (a path, a number, a name). The tables above show them as they "
             "appear; `tests/test_errors_doc.py` fails when the code has a message this list lacks.\n",
             "| where | message |", "|---|---|"]
    for module, function, text in message_templates():
        lines.append(f"| `{module}.{function}` | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _cell(text):
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else ""


def run_case(case, root, base):
    """-> (api text, cli last line, exit code, loaded-before-refusal) with paths made relative."""
    tmp = root / case.id
    tmp.mkdir()

    def rel(s):
        for folder in (tmp / "api", tmp / "cli", root):
            s = s.replace(str(folder) + "/", "")
        return s

    skip = T.skip_reason(case)
    if skip:
        return f"(skipped: {skip})", "", "", False
    (tmp / "api").mkdir()
    inp = case.build(tmp / "api", base)
    try:
        T.run_api(inp)
        api = "works (answer returned)"
    except NpvlmError as e:
        api = f"{type(e).__name__}: {rel(str(e))}"
    (tmp / "cli").mkdir()
    inp = case.build(tmp / "cli", base)
    r = T.run_cli(inp, tmp / "cli")
    cli = rel(r.last_line) if r.returncode else "answer on stdout"
    return api, cli, r.returncode, "loading" in r.stderr


def command_table(title, intro, command, cases, run, root, base):
    """A command's table: each case run, its last stderr line with the temporary paths cut."""
    out = [f"\n## {title}\n", intro + "\n", f"| case | `{command}` (last stderr line) | exit | what to do |",
           "|---|---|---|---|"]
    for case in cases:
        tmp = root / case.id
        tmp.mkdir()
        r = run(case.build(tmp, base), tmp)
        line = r.last_line
        for prefix in (tmp, root, ROOT):
            line = line.replace(str(prefix) + "/", "")
        out.append(f"| {case.what} | {_cell(line)} | {r.returncode} | {case.todo} |")
    return out


def make_doc():
    out = [HEADER]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = T.make_base(root / "base")
        groups = []
        for case in CASES:
            if case.group not in groups:
                groups.append(case.group)
        for group in groups:
            out.append(f"\n## {group}\n")
            out.append("| case | API | run.py (last stderr line) | exit | what to do |")
            out.append("|---|---|---|---|---|")
            for case in (c for c in CASES if c.group == group):
                api, cli, code, loaded = run_case(case, root, base)
                api_cell = "works" if case.api is None and not api.startswith("(") else _cell(api)
                exit_cell = str(code) + ("" if code in (0, "") else
                                         (", before load" if not loaded else ""))
                cli_cell = "works: answer on stdout" if code == 0 else _cell(cli)
                todo = case.todo or ("nothing; it works" if case.api is None else "")
                out.append(f"| {case.what} | {api_cell} | {cli_cell} | {exit_cell} | {todo} |")
        out += command_table(T.FT, "Each refused before any step is taken or, for a loss that is not finite, at the "
                                   "step it happens; in every case nothing is written to `--out`.",
                             "python -m npvlm.finetune", FINETUNE_CASES, T.run_finetune_cli, root, base)
        out += command_table(T.EV, "Each refused before the model is loaded (every line's ground truth is checked "
                                   "first); nothing is written to `--predictions`.",
                             "python -m npvlm.evaluate", EVALUATE_CASES, T.run_evaluate_cli, root, base)
    out.append(messages_section())
    out.append(FOOTER)
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "errors.md"), help="file, or - for stdout")
    args = p.parse_args()
    text = make_doc()
    if args.out == "-":
        print(text)
    else:
        from npvlm.saving.atomic import write_text_atomic
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
