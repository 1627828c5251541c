"""Fixtures and hooks only (shared helpers live in tests/helpers.py): golden sets, the array
backends (every test that takes `xp` runs on NumPy and, where a GPU is usable, CuPy), the
optional reference stack, and the robustness tables' base model and run.py results."""

import os

import numpy as np
import pytest

from npvlm import cpu
from npvlm.backend import cupy_usable, get_backend

from helpers import BACKENDS, GOLDEN_MODELS, Golden, golden_meta
from robustness import make_base, run_cli_cases


def pytest_collection_modifyitems(config, items):
    if cupy_usable():
        return
    skip = pytest.mark.skip(reason="cupy backend not usable here (no cupy or no CUDA GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def fixed_blas_threads():
    """The suite runs at BLAS's own thread count, fixed, in this process and (NPVLM_THREADS) in
    the programs and notebooks it starts: its bit-for-bit comparisons, with other processes'
    results too, must not depend on what the machine does at the moment, as npvlm's choice from
    the load would (npvlm/cpu.py; that choice is tested in tests/test_cpu.py)."""
    n = cpu.default_threads()
    os.environ["NPVLM_THREADS"] = str(n)
    cpu.set_threads(n)


@pytest.fixture(scope="session", params=GOLDEN_MODELS)
def golden(request):
    golden_meta()
    return Golden(request.param)


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module of each usable backend (numpy; cupy where a GPU is usable)."""
    return np if request.param == "numpy" else get_backend("cupy")


@pytest.fixture(scope="session")
def torch_and_transformers():
    """The reference stack, or a clear skip (the .ci/run installs it, so CI runs these)."""
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[reference]'")
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed: pip install -e '.[reference]'")
    return torch, transformers


@pytest.fixture(scope="module")
def robust_base(tmp_path_factory):
    """A valid tiny model and image, made once per robustness table; cases copy what they change."""
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def cli_results(request, robust_base, tmp_path_factory):
    """run.py for every selected case of the module's table `CASES`, a few at a time."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", None) == "test_cli" and hasattr(item, "callspec")}
    cases = [c for c in request.module.CASES if c.id in wanted]
    return run_cli_cases(cases, robust_base, tmp_path_factory.mktemp("cli"))
