"""The decode loop's device -> host traffic: only the chosen ids come back each step.

CuPy syncs (and copies to the host) whenever an array becomes a Python value: bool(), int(),
float(), .item(), .tolist(), or an explicit transfer. On a CPU-only machine this is checked with
a stand-in "device" array, an ndarray subclass that counts those conversions (and whose
reductions stay 0-d arrays, as CuPy's do); the model's parameters and inputs live in it."""

import contextlib
import types

import numpy as np
import pytest

import npvlm
from npvlm import backend
from npvlm.api import PaliGemma
from npvlm.backend import to_device
from npvlm.generation import sampling
from npvlm.generation.generate import generate_ids
from npvlm.model import paligemma

from helpers import write_random_model


def _counted(name):
    def converted(self, *args):
        Device.conversions += 1
        return getattr(np.ndarray, name)(self, *args)
    return converted


class Device(np.ndarray):
    conversions = 0

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return super().__array_wrap__(arr, context, False)      # reductions stay arrays

    __bool__, __int__, __float__ = _counted("__bool__"), _counted("__int__"), _counted("__float__")
    __index__, item, tolist = _counted("__index__"), _counted("item"), _counted("tolist")


def _device_module():
    """A stand-in for cupy: numpy, whose asarray puts arrays on the 'device'."""
    xp = types.ModuleType("fake_device")
    xp.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    xp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(Device)
    stream = types.SimpleNamespace(synchronize=lambda: None)   # timers synchronize the device
    xp.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    return xp


@pytest.fixture(scope="module")
def device_model(tmp_path_factory):
    model = npvlm.load(write_random_model(tmp_path_factory.mktemp("m")))
    xp = _device_module()
    return PaliGemma(model.cfg, to_device(model.params, xp), xp, model.path, model.processor)


def _traffic(model, monkeypatch, new_tokens):
    """(implicit conversions, explicit transfers) of one greedy generation."""
    transfers = []
    real = backend.to_host
    monkeypatch.setattr(sampling, "to_host", lambda x: transfers.append(x.shape) or real(x))
    inputs = model.processor([np.zeros((28, 28, 3), np.uint8)] * 2, ["caption en", "a"])
    Device.conversions = 0
    out = generate_ids(model, inputs, new_tokens)
    assert out.tokens.shape[1] == new_tokens and (out.lengths == new_tokens).all()
    return Device.conversions, transfers


def test_decode_loop_moves_only_the_chosen_ids(device_model, monkeypatch):
    # no stop ids are given, so every run generates exactly n tokens
    short = _traffic(device_model, monkeypatch, 2)
    long = _traffic(device_model, monkeypatch, 10)
    print(f"\n2 tokens: {short[0]} conversions, transfers {short[1]}\n"
          f"10 tokens: {long[0]} conversions, transfers {len(long[1])}")
    assert long[0] == short[0], "a decode step converts a device array to a host value"
    assert len(long[1]) - len(short[1]) == 8, "one explicit transfer per new token"
    assert all(shape == (2,) for shape in long[1]), "only the chosen ids [B] cross to the host"
    assert isinstance(device_model.params["text"]["norm"]["weight"], Device)


@pytest.mark.gpu
def test_cupy_decode_steps_never_synchronize(tmp_path, monkeypatch):
    """On a real GPU: a decode step (embedding, 2+ layers, lm_head) runs with CuPy's
    synchronization guard on, and only the chosen ids [B] come to the host per step. The guard
    (`cupyx.allow_synchronize`, deprecated since CuPy v10) is used while CuPy still has it; the
    count of host transfers is checked either way."""
    import cupyx  # noqa: PLC0415 (a GPU-only test: cupy is an optional extra)
    no_sync = getattr(cupyx, "allow_synchronize", lambda allow: contextlib.nullcontext())
    model = npvlm.load(write_random_model(tmp_path), backend="cupy")
    real = paligemma.decode_step

    def guarded(*args, **kwargs):
        with no_sync(False):
            return real(*args, **kwargs)
    monkeypatch.setattr(paligemma, "decode_step", guarded)
    transfers = []
    monkeypatch.setattr(sampling, "to_host", lambda x: transfers.append(x.shape) or backend.to_host(x))
    inputs = model.processor([np.zeros((28, 28, 3), np.uint8)] * 2, ["caption en", "a"])
    out = generate_ids(model, inputs, 8)
    assert out.tokens.shape == (2, 8)
    assert transfers == [(2,)] * 8, transfers
