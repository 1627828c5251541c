"""The package layout (docs/architecture.md draws it): which part of npvlm may import which, the
model math running with numpy alone, and an `import npvlm` that imports nothing until used."""

import ast
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

import npvlm
from npvlm.model import paligemma
from npvlm.tree import flatten

from helpers import GOLDENS, GradGolden

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "npvlm"


def part(path):
    """The part of npvlm a module belongs to: its folder, or for a top-level module its role."""
    rel = path.relative_to(PACKAGE)
    if rel.as_posix() == "demo/__init__.py":
        return "base"                  # the demo's file paths (MODEL_DIR, SAMPLE_SCENE): data, no imports
    if len(rel.parts) > 1:
        return rel.parts[0]
    return {"config.py": "base", "errors.py": "base", "backend.py": "base", "tree.py": "base", "cpu.py": "base",
            "api.py": "api", "parity.py": "parity", "__init__.py": "package",
            "cli.py": "commands", "finetune.py": "commands", "commands.py": "commands", "evaluate.py": "commands",
            "__main__.py": "commands"}[rel.name]


# part -> the other parts it imports: exactly the arrows of docs/architecture.md's map. Every
# part may also import "base" (config, errors, backend, tree).
ARROWS = {
    "base": set(),
    "model": set(),
    "metrics": set(),
    "inputs": set(),
    "loading": set(),
    "saving": {"loading"},
    "tasks": {"model"},
    "generation": {"inputs", "tasks"},
    "evaluation": {"inputs", "metrics", "tasks"},
    "explain": {"model", "inputs", "tasks", "saving"},
    "api": {"model", "inputs", "loading", "generation", "explain"},
    "demo": {"model", "metrics", "tasks", "saving", "api"},
    "training": {"model", "inputs", "loading", "saving", "demo", "evaluation"},
    "parity": set(),
    "commands": {"model", "inputs", "saving", "tasks", "generation", "api", "demo", "training", "explain",
                 "evaluation"},
    "package": set(),                  # __init__.py imports its public names lazily, on first use
}
MODULES = sorted(PACKAGE.rglob("*.py"))


def imports(path):
    """(absolute top-level names, npvlm module paths) that a module imports, at any depth."""
    external, internal = set(), set()
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]       # ("npvlm", "model")
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (internal if alias.name.startswith("npvlm") else external).add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                if name.split(".")[0] == "npvlm":
                    internal.update(f"{name}.{a.name}" for a in node.names)
                else:
                    external.add(name.split(".")[0])
            else:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ((node.module,) if node.module else ()))
                internal.update(f"{module}.{a.name}" for a in node.names)
    return external, internal


def part_of_name(dotted):
    """The part of a dotted npvlm name ("npvlm.model.layers.linear", "npvlm.backend.to_host")."""
    parts = dotted.split(".")[1:]
    for n in range(len(parts), 0, -1):
        candidate = PACKAGE.joinpath(*parts[:n])
        for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if path.is_file():
                return part(path)
    raise AssertionError(f"{dotted}: no such npvlm module")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_each_part_imports_only_what_the_picture_allows(path):
    own = part(path)
    _, internal = imports(path)
    allowed = ARROWS[own] | {own, "base"}
    wrong = sorted(f"{name} ({part_of_name(name)})" for name in internal if part_of_name(name) not in allowed)
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) may import {sorted(ARROWS[own])} and base, but imports {wrong}"


def test_every_arrow_of_the_picture_is_an_import():
    """The map draws no arrow that the code does not have (a part that stops importing another
    takes its arrow out of docs/architecture.md and ARROWS)."""
    used = {name: set() for name in ARROWS}
    for path in MODULES:
        own = part(path)
        used[own] |= {part_of_name(name) for name in imports(path)[1]} - {own, "base"}
    assert used == ARROWS


@pytest.mark.parametrize("path", sorted((PACKAGE / "model").glob("*.py")) + sorted((PACKAGE / "metrics").glob("*.py")),
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_the_model_math_and_the_metrics_import_numpy_and_the_standard_library_alone(path):
    external, _ = imports(path)
    assert external <= {"numpy"} | set(sys.stdlib_module_names), \
        f"{path.relative_to(ROOT)} imports {sorted(external - {'numpy'} - set(sys.stdlib_module_names))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_only_the_backend_imports_cupy_and_nothing_imports_torch(path):
    external, _ = imports(path)
    if path.name != "backend.py":
        assert "cupy" not in external, f"{path.name} imports cupy; only backend.py may"
    assert not external & {"torch", "transformers"}, f"{path.name} imports a dev-only package"


def test_every_part_is_in_the_picture():
    assert {part(p) for p in MODULES} == set(ARROWS)
    text = (ROOT / "docs" / "architecture.md").read_text()
    picture = text[:text.index("\n## ")]
    missing = [f"{name}/" for name in ARROWS if (PACKAGE / name).is_dir() and f"{name}/" not in picture]
    assert not missing, f"docs/architecture.md's opening picture does not show {missing}"


# ---- what gets imported -------------------------------------------------------------------------

def imported_modules(code):
    """The modules a fresh interpreter has imported after running `code`."""
    r = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_import_npvlm_imports_no_submodule_and_no_package():
    loaded = imported_modules("import npvlm")
    assert {m for m in loaded if m.startswith("npvlm")} == {"npvlm"}
    assert not loaded & {"numpy", "PIL", "sentencepiece", "safetensors", "ml_dtypes", "tqdm", "huggingface_hub"}


def test_public_names_and_submodules_resolve_on_first_use():
    loaded = imported_modules("import npvlm\nassert npvlm.InputError is npvlm.errors.InputError\n"
                              "assert callable(npvlm.load) and npvlm.model.layers.linear")
    assert {"npvlm.api", "npvlm.errors", "npvlm.model.layers"} <= loaded
    r = subprocess.run([sys.executable, "-c", "import npvlm; npvlm.no_such_name"], capture_output=True, text=True)
    assert r.returncode != 0 and "module 'npvlm' has no attribute 'no_such_name'" in r.stderr


# What the first command (`npvlm` on the demo model) imports: the demo checkpoint is BF16, read
# without ml_dtypes; it is too small for a progress bar (tqdm); it is no Hub id (huggingface_hub).
DEMO_RUN_MODULES = {
    "npvlm", "npvlm.api", "npvlm.backend", "npvlm.cli", "npvlm.commands", "npvlm.config", "npvlm.demo",
    "npvlm.demo.scenes", "npvlm.errors", "npvlm.generation", "npvlm.generation.generate",
    "npvlm.generation.sampling", "npvlm.inputs", "npvlm.inputs.image", "npvlm.inputs.processor",
    "npvlm.inputs.tokenizer", "npvlm.loading", "npvlm.loading.bf16", "npvlm.loading.hub",
    "npvlm.loading.safetensors_file", "npvlm.loading.weights", "npvlm.model", "npvlm.model.attention",
    "npvlm.model.gemma", "npvlm.model.kv_cache", "npvlm.model.layers", "npvlm.model.loss",
    "npvlm.model.masks", "npvlm.model.paligemma", "npvlm.model.record", "npvlm.model.rope",
    "npvlm.model.siglip", "npvlm.saving", "npvlm.saving.atomic", "npvlm.tasks", "npvlm.tasks.detection",
    "npvlm.tasks.draw", "npvlm.tasks.segmentation", "npvlm.cpu", "npvlm.tree",
}


def test_the_demo_run_imports_these_modules_and_no_optional_package():
    loaded = imported_modules("import contextlib, io\nfrom npvlm.cli import main\n"
                              "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
                              "    assert main([]) == 0")
    ours = {m for m in loaded if m.startswith("npvlm")}
    assert ours == DEMO_RUN_MODULES, f"imported now: {sorted(ours - DEMO_RUN_MODULES)}; " \
                                     f"no longer: {sorted(DEMO_RUN_MODULES - ours)}"
    assert not loaded & {"ml_dtypes", "tqdm", "huggingface_hub", "torch", "transformers"}


def test_the_math_alone_imports_no_other_part_of_npvlm():
    loaded = imported_modules("import npvlm.model.paligemma")
    assert {m for m in loaded if m.startswith("npvlm")} == {
        "npvlm", "npvlm.backend", "npvlm.config", "npvlm.errors", "npvlm.tree", "npvlm.model",
        *(f"npvlm.model.{p.stem}" for p in (PACKAGE / "model").glob("*.py") if p.stem != "__init__")}


# ---- the model math with numpy alone ------------------------------------------------------------

def numpy_only_python(folder):
    """A python whose environment holds numpy and npvlm, nothing else: $NPVLM_NUMPY_ONLY_PYTHON
    (.ci/run makes one with `pip install numpy` and `pip install --no-deps -e .`), else a new
    virtual environment here with this numpy linked into it and a .pth file naming this
    checkout (what `pip install --no-deps -e .` writes)."""
    if os.environ.get("NPVLM_NUMPY_ONLY_PYTHON"):
        return os.environ["NPVLM_NUMPY_ONLY_PYTHON"]
    env = folder / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    numpy_dir = Path(np.__file__).resolve().parent
    for item in (numpy_dir, numpy_dir.parent / "numpy.libs"):
        if item.exists():
            (site / item.name).symlink_to(item, target_is_directory=True)
    (site / "npvlm_checkout.pth").write_text(str(ROOT) + "\n")
    return python


@pytest.mark.parametrize("golden", ["pg1_mqa_hub", "pg2_gqa_v5"])
def test_a_forward_and_backward_pass_with_numpy_alone(tmp_path, golden):
    """tests/numpy_only.py in a numpy-only environment gives the loss, logits and gradients that
    this process gives (PaliGemma 1 MQA; PaliGemma 2 with softcaps and a sliding window)."""
    model = npvlm.load(GOLDENS / golden / "model")
    batch = {k: v for k, v in GradGolden(golden).batch.items()}
    (tmp_path / "config.json").write_text((GOLDENS / golden / "model" / "config.json").read_text())
    np.savez(tmp_path / "params.npz", **flatten(model.params))
    np.savez(tmp_path / "batch.npz", **batch)
    python = numpy_only_python(tmp_path)
    r = subprocess.run([python, "-I", str(ROOT / "tests" / "numpy_only.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not set(json.loads((tmp_path / "modules.json").read_text())) - {
        "npvlm", "npvlm.backend", "npvlm.config", "npvlm.errors", "npvlm.tree", "npvlm.model",
        *(f"npvlm.model.{p.stem}" for p in (PACKAGE / "model").glob("*.py"))}

    save = {}
    loss = paligemma.forward_loss(batch, model.params, model.cfg, save=save)
    grads = flatten(paligemma.backward(save, model.params, model.cfg))
    logits = paligemma.prefill({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                               model.params, model.cfg)
    with np.load(tmp_path / "result.npz") as there:
        assert set(there.files) == {"loss", "logits"} | {f"grad.{k}" for k in grads}
        ours = {"loss": loss, "logits": logits} | {f"grad.{k}": g for k, g in grads.items()}
        worst = max((float(np.abs(there[k] - v).max()) / max(1e-30, float(np.abs(v).max())), k)
                    for k, v in ours.items())
    print(f"{golden}: {len(ours)} tensors, largest relative difference {worst[0]:.1e} ({worst[1]})")
    assert worst[0] <= 1e-6, worst
