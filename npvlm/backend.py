"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

The backend is chosen once, when a model is loaded (`npvlm.load(path, backend="cupy")`): the
parameter tree is moved to the device there (`to_device`), inputs are moved once after
preprocessing, and every compute function asks its inputs which array library to use
(`xp = array_module(x)`). There is no global switch.

This is the only module in npvlm that imports cupy (a test enforces it).
"""

import numpy as np

from .errors import BackendError
from .tree import map_with_path

BACKENDS = ("numpy", "cupy")

_cupy = None  # the cupy module, imported on first use


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415 (deliberately lazy: cupy is an optional extra)
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            raise BackendError(
                f"backend 'cupy' is not usable: cannot import cupy ({type(e).__name__}: {e}); "
                "install it with `pip install -e .[gpu]` on a machine with an NVIDIA GPU") from None
        _cupy = cupy
    return _cupy


def array_module(x):
    """The array library (numpy or cupy) that owns array `x`: the backend follows the data."""
    if type(x).__module__.partition(".")[0] == "cupy":
        return _import_cupy()
    return np


def get_backend(name):
    """The array module for a backend name, after checking that it can run here."""
    if name == "numpy":
        return np
    if name == "cupy":
        cupy = _import_cupy()
        try:
            usable = cupy.cuda.is_available()
        except Exception:  # older cupy re-raises CUDA errors from is_available
            usable = False
        if not usable:
            raise BackendError("backend 'cupy' is not usable: cupy is installed but no CUDA GPU "
                               "is available; use --backend numpy")
        return cupy
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


def cupy_usable():
    """True when the cupy backend can run here (for tests that are skipped without a GPU)."""
    try:
        get_backend("cupy")
        return True
    except BackendError:
        return False


def to_device(tree, xp):
    """Copy every array of a parameter tree to the array library `xp` (once, at load). A weight
    that is not an array (a BF16Matrix) stays as it is."""
    def move(_, leaf):
        return xp.asarray(leaf) if isinstance(leaf, np.ndarray) or array_module(leaf) is not np else leaf
    return map_with_path(move, tree)


def scatter_add(table, index, values):
    """table[index[i]] += values[i] for every i, repeats summed (an embedding gradient).
    table: [V, D], index: int[n], values: [n, D]; in place, on either backend (CuPy >= 12 has
    ufunc.at; it runs as atomic adds, so the summation order differs from NumPy's)."""
    xp = array_module(table)
    xp.add.at(table, index, values)


def synchronize(xp):
    """Wait for queued device work (CuPy runs asynchronously); a no-op on NumPy. Timers call
    this before reading the clock."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def to_host(x):
    """A NumPy copy (or view) of an array from either backend: the explicit device->host point."""
    if array_module(x) is np:
        return np.asarray(x)
    return x.get()
