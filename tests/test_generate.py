"""The decode loop's device -> host traffic: only the chosen ids come back each step.

CuPy syncs (and copies to the host) whenever an array becomes a Python value: bool(), int(),
float(), .item(), .tolist(), or an explicit transfer (`.get()`). On a CPU-only machine this is
checked with the CuPy stand-in of tests/fake_cupy.py, which counts the conversions
(`DeviceArray.syncs`); the explicit transfers are counted by shape. On a GPU the same loop runs
under CuPy's own synchronization guard (the last test)."""

import contextlib

import numpy as np
import pytest

import npvlm
from npvlm import backend
from npvlm.generation import sampling
from npvlm.generation.generate import generate_ids
from npvlm.model import paligemma

import fake_cupy
from helpers import write_random_model

REAL_GET = fake_cupy.DeviceArray.get


@pytest.fixture
def device_model(tmp_path, monkeypatch):
    fake_cupy.install(monkeypatch)
    return npvlm.load(write_random_model(tmp_path), backend="cupy")


def _traffic(model, monkeypatch, new_tokens):
    """(conversions to Python values, shapes of the explicit transfers) of one greedy generation."""
    transfers = []
    monkeypatch.setattr(fake_cupy.DeviceArray, "get", lambda self: transfers.append(self.shape) or REAL_GET(self))
    inputs = model.processor([np.zeros((28, 28, 3), np.uint8)] * 2, ["caption en", "a"])
    fake_cupy.DeviceArray.syncs = 0
    out = generate_ids(model, inputs, new_tokens)
    assert out.tokens.shape[1] == new_tokens and (out.lengths == new_tokens).all()
    return fake_cupy.DeviceArray.syncs, transfers


def test_decode_loop_moves_only_the_chosen_ids(device_model, monkeypatch):
    # no stop ids are given, so every run generates exactly n tokens
    short = _traffic(device_model, monkeypatch, 2)
    long = _traffic(device_model, monkeypatch, 10)
    print(f"\n2 tokens: {short[0]} conversions, transfers {short[1]}\n"
          f"10 tokens: {long[0]} conversions, transfers {len(long[1])}")
    assert long[0] == short[0], "a decode step converts a device array to a host value"
    assert len(long[1]) - len(short[1]) == 8, "one explicit transfer per new token"
    assert long[1] == [(2,)] * 10, "only the chosen ids [B] cross to the host"
    assert isinstance(device_model.params["text"]["norm"]["weight"], fake_cupy.DeviceArray)


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
