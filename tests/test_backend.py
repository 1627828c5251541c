"""The backend rule: only npvlm/backend.py imports cupy; npvlm never imports torch/transformers."""

import ast
from pathlib import Path

import numpy as np
import pytest

from npvlm.backend import array_module, get_backend, to_device
from npvlm.errors import BackendError

PACKAGE = Path(__file__).resolve().parent.parent / "npvlm"


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_import_rules(path):
    mods = set(_imports(path))
    if path.name != "backend.py":
        assert "cupy" not in mods, f"{path.name} imports cupy; only backend.py may"
    assert not mods & {"torch", "transformers"}, f"{path.name} imports a dev-only package"


def test_numpy_is_default_and_follows_data():
    assert get_backend("numpy") is np
    assert array_module(np.zeros(2)) is np
    tree = to_device({"a": [np.zeros(2)], "b": {"c": np.ones(1)}}, np)
    assert isinstance(tree["a"][0], np.ndarray)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown backend 'torch'"):
        get_backend("torch")


def test_cupy_without_gpu_is_a_clear_error():
    try:
        get_backend("cupy")
    except BackendError as e:
        assert "cupy" in str(e) and "\n" not in str(e)
    else:
        pytest.skip("a usable GPU is present: the error path cannot be exercised")
