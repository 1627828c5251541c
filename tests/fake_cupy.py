"""A stand-in for CuPy on a machine without a GPU, strict where CuPy is strict, so the CuPy code
paths can be rehearsed on the CPU (tests/test_fake_cupy.py) before the one short GPU run.

`DeviceArray` wraps a NumPy array the way a CuPy array "lives on the device":

- an operation that mixes it with a plain NumPy array raises TypeError, as CuPy does ("Unsupported
  type <class 'numpy.ndarray'>"); Python and NumPy scalars are fine, as in CuPy;
- an implicit conversion to NumPy (`np.asarray(x)`, `np.array(x)`) raises TypeError, as CuPy's
  `__array__` does; the explicit transfer is `x.get()`, as in CuPy;
- reductions return 0-d arrays, not scalars, as CuPy's do; `bool()`, `int()`, `float()` work (a
  sync on a GPU) and are counted in `DeviceArray.syncs`;
- every array a NumPy function or method returns is a DeviceArray again.

`module()` is the `xp` that goes with it: numpy's namespace whose array-making functions return
DeviceArrays, with `cuda` (a no-op stream synchronize), `ndarray` and `get_array_module`.
`install(monkeypatch)` makes npvlm.backend hand it out for backend "cupy".
"""

import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


def _wrap(x):
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, np.generic):                    # CuPy reductions give 0-d arrays
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x, what):
    if isinstance(x, DeviceArray):
        return x.a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {what}: a host NumPy array mixed with device arrays")
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(v, what) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, what) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(*(_unwrap(v, what) for v in (x.start, x.stop, x.step)))
    return x


class DeviceArray(NDArrayOperatorsMixin):
    __slots__ = ("a",)
    syncs = 0

    def __init__(self, a):
        self.a = a

    # ---- NumPy protocols ---------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"np.{ufunc.__name__}"
        args = _unwrap(inputs, what)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], what)
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        what = f"np.{func.__name__}"
        return _wrap(func(*_unwrap(args, what), **_unwrap(kwargs, what)))

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    # ---- attributes and methods: the wrapped array's, results on the device -------------------
    def __getattr__(self, name):
        if name.startswith("__"):      # no __array_interface__ etc.: NumPy must not see the data
            raise AttributeError(name)
        value = getattr(self.a, name)
        if callable(value):
            return lambda *args, **kwargs: _wrap(value(*_unwrap(args, name), **_unwrap(kwargs, name)))
        return _wrap(value)

    def __getitem__(self, index):
        return _wrap(self.a[_unwrap(index, "indexing")])

    def __setitem__(self, index, value):
        self.a[_unwrap(index, "indexing")] = _unwrap(value, "assignment")

    def __len__(self):
        return len(self.a)

    def get(self):
        """The explicit device -> host copy (cupy.ndarray.get)."""
        return self.a.copy()

    # ---- conversions to Python values: allowed (a sync), counted ----------------------------
    def _sync(self):
        DeviceArray.syncs += 1

    def __bool__(self):
        self._sync()
        return bool(self.a)

    def __int__(self):
        self._sync()
        return int(self.a)

    def __float__(self):
        self._sync()
        return float(self.a)

    def __index__(self):
        self._sync()
        return self.a.__index__()

    def item(self):
        self._sync()
        return self.a.item()

    def tolist(self):
        self._sync()
        return self.a.tolist()

    def __repr__(self):
        return f"DeviceArray({self.a!r})"


DeviceArray.__module__ = "cupy._fake"      # npvlm.backend.array_module: "cupy" arrays use cupy


def _maker(f):
    def make(*args, **kwargs):
        if args and isinstance(args[0], DeviceArray):
            return _wrap(f(args[0].a, *args[1:], **kwargs))
        return _wrap(f(*_unwrap(args, f.__name__), **_unwrap(kwargs, f.__name__)))
    return make


def module():
    xp = types.ModuleType("cupy")
    for name in dir(np):
        if not name.startswith("_"):
            setattr(xp, name, getattr(np, name))

    def asarray(a, dtype=None):          # the host -> device transfer
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.a.dtype == dtype else DeviceArray(a.a.astype(dtype))
        return DeviceArray(np.array(a, dtype=dtype))
    xp.asarray = xp.array = asarray
    for name in ("zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
                 "full_like", "eye"):
        setattr(xp, name, _maker(getattr(np, name)))
    stream = types.SimpleNamespace(synchronize=lambda: None)
    xp.cuda = types.SimpleNamespace(get_current_stream=lambda: stream, is_available=lambda: True)
    xp.ndarray = DeviceArray
    xp.get_array_module = lambda *args: xp
    xp.asnumpy = lambda a: a.get() if isinstance(a, DeviceArray) else np.asarray(a)
    return xp


def install(monkeypatch):
    """npvlm.backend gives this module for "cupy" arrays and backend="cupy"; returns it."""
    from npvlm import backend
    xp = module()
    monkeypatch.setattr(backend, "_cupy", xp)
    return xp
