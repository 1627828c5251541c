"""Regenerate the walkthrough notebooks: execute each `notebooks/NN_*.py` (jupytext py:percent,
the reviewed source of truth) in a fresh kernel and write it, outputs and figures included, to
`NN_*.ipynb` next to it.

    python notebooks/build.py                          # every notebook
    python notebooks/build.py 03_siglip_encoder.py     # some of them (names or paths)

Needs the notebooks extra: pip install -e ".[notebooks]". Prints each notebook's execution time.
Equivalent to `jupytext --to ipynb --execute notebooks/NN_x.py`, but without per-cell execution
timestamps in the metadata (so a rebuild changes only what the outputs change).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CELL_TIMEOUT_S = 300
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def kernel_env():
    """The kernel inherits this process's environment: make `import npvlm` work from a checkout
    that is not pip-installed, and keep matplotlib's inline backend (an MPLBACKEND=Agg set in the
    shell would otherwise stop ipykernel from selecting it, and no figure would be saved)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"


def read_source(py):
    """The .py source as a notebook (no outputs), with the metadata every .ipynb carries."""
    nb = jupytext.read(py)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    return nb


def execute(nb, cwd, timeout=CELL_TIMEOUT_S):
    """Run every cell in a fresh python3 kernel started in `cwd`; raise on the first error."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def build(py):
    py = Path(py)
    nb = read_source(py)
    t0 = time.perf_counter()
    execute(nb, py.parent)
    seconds = time.perf_counter() - t0
    nbformat.write(nb, py.with_suffix(".ipynb"))
    size = py.with_suffix(".ipynb").stat().st_size
    print(f"{py.name:<40} {seconds:6.1f} s   {size / 1024:6.0f} KB", flush=True)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="NN_name.py files (default: all)")
    args = parser.parse_args(argv)
    paths = [Path(p) if Path(p).exists() else HERE / p for p in args.notebooks] or \
        sorted(HERE.glob("[0-9][0-9]_*.py"))
    kernel_env()
    total = sum(build(p) for p in paths)
    print(f"{len(paths)} notebook(s) in {total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
