"""The walkthrough notebooks (notebooks/NN_*.py, jupytext py:percent sources, and their executed
.ipynb twins): every .ipynb is in sync with its .py, carries its outputs, and executes from a
clean kernel without an error, changing nothing but outputs, within the time budget.

Regenerate the .ipynb files after editing a .py: python notebooks/build.py"""

import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 120
BUDGET_S = 120          # each notebook must run on a CPU in under two minutes
MAX_IPYNB_BYTES = 300_000
INSTALL = "pip install -e '.[notebooks]'"
DEMO_CONFIG = ROOT / "npvlm" / "demo" / "model" / "config.json"
REBUILD = "python notebooks/build.py"

nbformat = pytest.importorskip("nbformat", reason=f"nbformat not installed: {INSTALL}")
jupytext = pytest.importorskip("jupytext", reason=f"jupytext not installed: {INSTALL}")


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def _ipynb(py):
    path = py.with_suffix(".ipynb")
    if not path.is_file():
        pytest.fail(f"{path.name} missing; regenerate with: {REBUILD} {py.name}")
    return nbformat.read(path, as_version=4)


def test_notebooks_exist():
    names = [p.stem for p in SOURCES]
    assert len(names) >= 10 and names[0].startswith("00_"), names
    stray = sorted({p.stem for p in NOTEBOOKS.glob("*.ipynb")} - set(names))
    assert not stray, f"notebooks without a .py source: {stray}"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_ipynb_in_sync_with_source(py):
    """The .py is the reviewed source: the .ipynb must hold the same cells (code and markdown)."""
    source, notebook = _cells(jupytext.read(py)), _cells(_ipynb(py))
    assert source == notebook, f"{py.with_suffix('.ipynb').name} is stale; regenerate with: {REBUILD} {py.name}"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_committed_outputs(py):
    """The committed .ipynb was executed: every code cell ran, none failed, figures are there, and
    the file stays small."""
    nb = _ipynb(py)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{py.name}: not executed; run {REBUILD} {py.name}"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{py.name}: committed with an error output: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{py.name}: no figure"
    size = py.with_suffix(".ipynb").stat().st_size
    assert size < MAX_IPYNB_BYTES, f"{py.name}: .ipynb is {size} bytes (limit {MAX_IPYNB_BYTES}); shrink the figures"


@pytest.fixture(scope="module")
def kernel_env():
    """nbclient + a python3 kernel + matplotlib, and the kernel's environment: `import npvlm` from
    this checkout, and matplotlib's inline backend (a shell's MPLBACKEND=Agg would stop ipykernel
    from selecting it)."""
    nbclient = pytest.importorskip("nbclient", reason=f"nbclient not installed: {INSTALL}")
    pytest.importorskip("ipykernel", reason=f"ipykernel not installed: {INSTALL}")
    pytest.importorskip("matplotlib", reason=f"matplotlib not installed: {INSTALL}")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MPLBACKEND")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    yield nbclient
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(py, kernel_env, tmp_path):
    """Execute a copy of the .ipynb, outputs cleared, in a fresh kernel started in a temporary
    folder: no cell may fail, the cells' sources must not change, and it must fit the budget."""
    # the demo is committed package data; its absence is a broken checkout, not a reason to skip
    assert 'MODEL = "demo"' not in py.read_text() or DEMO_CONFIG.is_file(), \
        f"{DEMO_CONFIG} missing: restore npvlm/demo/model (or python tools/train_demo.py)"
    copy = tmp_path / py.with_suffix(".ipynb").name
    shutil.copy(py.with_suffix(".ipynb"), copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    before = _cells(nb)
    client = kernel_env.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                       resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except kernel_env.exceptions.CellExecutionError as e:
        pytest.fail(f"{py.name}: a cell failed:\n{e}")
    seconds = time.perf_counter() - t0
    print(f"{py.name}: executed in {seconds:.1f} s")
    assert _cells(nb) == before, f"{py.name}: executing changed cell sources"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert seconds < BUDGET_S, f"{py.name}: took {seconds:.0f} s, over the {BUDGET_S} s budget"
