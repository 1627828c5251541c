"""Shared fixtures: golden files (made by HF transformers), backends, optional torch."""

import configparser
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
GOLDEN_FORMAT_VERSION = 1
REGENERATE = "python tools/make_goldens.py  (needs: pip install -e '.[reference]')"
GOLDEN_MODELS = ("pg1_mqa_hub", "pg1_gqa_v5", "pg2_gqa_hub", "pg2_gqa_v5")

sys.path.insert(0, str(ROOT / "tools"))   # hf_reference, for the live tests

from npvlm.backend import cupy_usable  # noqa: E402

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if cupy_usable():
        return
    skip = pytest.mark.skip(reason="cupy backend not usable here (no cupy or no CUDA GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def param_leaves(tree, prefix=""):
    """(dotted name, array) for every array of a nested dict/list parameter tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from param_leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from param_leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def one_line_error(exc_type, call, *fragments):
    """`call()` must raise `exc_type` with a one-line message holding every fragment."""
    with pytest.raises(exc_type) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def pinned_transformers():
    """The transformers version that setup.cfg's [reference] extra pins."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options.extras_require"]["reference"].split():
        if line.startswith("transformers=="):
            return line.split("==")[1]
    raise AssertionError("setup.cfg: no transformers pin in the reference extra")


def golden_meta():
    path = GOLDENS / "meta.json"
    if not path.is_file():
        pytest.fail(f"golden files missing ({path}); regenerate with: {REGENERATE}")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != GOLDEN_FORMAT_VERSION:
        pytest.fail(f"golden files are stale (format {meta.get('format_version')}, tests expect "
                    f"{GOLDEN_FORMAT_VERSION}); regenerate with: {REGENERATE}")
    made_with = meta.get("versions", {}).get("transformers")
    if made_with != pinned_transformers():
        pytest.fail(f"golden files are stale (made with transformers {made_with}, setup.cfg pins "
                    f"{pinned_transformers()}); regenerate with: {REGENERATE}")
    return meta


class Golden:
    """One golden set: the checkpoint folder and the HF tensors."""

    def __init__(self, name):
        self.name = name
        self.dir = GOLDENS / name
        self.model_dir = self.dir / "model"
        npz = self.dir / "goldens.npz"
        if not npz.is_file() or not self.model_dir.is_dir():
            pytest.fail(f"golden set {name} missing; regenerate with: {REGENERATE}")
        with np.load(npz) as data:
            self.arrays = {k: data[k] for k in data.files}

    def __getitem__(self, key):
        return self.arrays[key]

    def stage_names(self):
        order = ["vision.embed"] + sorted(k for k in self.arrays if k.startswith("vision.layer.")) + [
            "vision.post_norm", "projector", "text.embed"] + sorted(
            k for k in self.arrays if k.startswith("text.layer.")) + ["text.final_norm", "logits"]
        return order


@pytest.fixture(scope="session", params=GOLDEN_MODELS)
def golden(request):
    golden_meta()
    return Golden(request.param)


@pytest.fixture(scope="session")
def torch_and_transformers():
    """The reference stack, or a clear skip (the .ci/run installs it, so CI runs these)."""
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[reference]'")
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed: pip install -e '.[reference]'")
    return torch, transformers
