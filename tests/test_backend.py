"""The backend switch: NumPy by default, the array module follows the data, clear errors for a
backend that cannot run (the import rule, only backend.py imports cupy: tests/test_layout.py)."""

import numpy as np
import pytest

from npvlm.backend import array_module, get_backend, to_device
from npvlm.errors import BackendError


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
