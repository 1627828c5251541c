"""npvlm/loading/safetensors_file.py: the thin wrapper over the `safetensors` package. Values as the
package reads them (BF16 widened exactly), and every kind of damaged file as one
CheckpointError line that names the file (and the tensor, where one is to blame)."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from npvlm.errors import CheckpointError
from npvlm.loading.bf16 import bf16_to_f32
from npvlm.loading.safetensors_file import SafetensorsFile

from helpers import one_line_error, save_safetensors

rng = np.random.default_rng(0)


def test_float_dtypes_read_as_float32(tmp_path):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"f32": x, "f16": x.astype(np.float16), "f64": x.astype(np.float64),
                            "bf16": x.astype(ml_dtypes.bfloat16)}, metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == ["bf16", "f16", "f32", "f64"]
        assert {k: f.dtype(k) for k in f.keys()} == {"f32": "F32", "f16": "F16", "f64": "F64", "bf16": "BF16"}
        assert f.shape("bf16") == (3, 5) and f.nbytes("bf16") == 30 and f.nbytes("f64") == 120
        for k, want in [("f32", x), ("f16", x.astype(np.float16)), ("f64", x),
                        ("bf16", x.astype(ml_dtypes.bfloat16))]:
            got = f.read(k)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, want.astype(np.float32))
        bits = f.read_bits("bf16")
        assert bits.dtype == np.uint16
        # the package's ml_dtypes widening equals the exact 16-bit shift
        np.testing.assert_array_equal(f.read("bf16").view(np.uint32), bits.astype(np.uint32) << 16)
        np.testing.assert_array_equal(bf16_to_f32(bits), f.read("bf16"))


def _file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"a": np.ones((4, 4), np.float32), "b": np.zeros(8, np.float32)})
    return path, path.read_bytes()


def _with_header(raw, change):
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _offsets(name, offsets):
    return lambda h: h[name].update(data_offsets=offsets)


DAMAGE = {
    "empty": (lambda raw: b"", "shorter than the 8-byte header length"),
    "5 bytes": (lambda raw: raw[:5], "shorter than the 8-byte header length"),
    "header length past the end": (lambda raw: struct.pack("<Q", len(raw) * 2) + raw[8:],
                                   "header length runs past the end of the file"),
    "header length absurd": (lambda raw: struct.pack("<Q", 2**62) + raw[8:],
                             "larger than the 100000000-byte limit"),
    "pickle": (lambda raw: b"\x80\x04\x95" + b"x" * 64, "not a safetensors file"),
    "header not JSON": (lambda raw: raw[:8] + b"{not json" + raw[17:], "header is not valid JSON"),
    "truncated": (lambda raw: raw[:-20], "tensor 'b': data_offsets [64, 96] run past the end of the file"),
    "extra bytes": (lambda raw: raw + b"12345678", "do not cover the data exactly"),
    "overlap": (lambda raw: _with_header(raw, _offsets("b", [0, 32])), "overlap another tensor"),
    "shape vs bytes": (lambda raw: _with_header(raw, lambda h: h["b"].update(shape=[9])),
                       "tensor 'b': shape [9] F32 needs 36 bytes but data_offsets hold 32"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=str)
def test_damaged_files_are_one_line_errors(tmp_path, damage):
    path, raw = _file(tmp_path)
    corrupt, fragment = DAMAGE[damage]
    path.write_bytes(corrupt(raw))
    msg = one_line_error(CheckpointError, lambda: SafetensorsFile(path), "model.safetensors: ", fragment)
    print(msg)


@pytest.mark.parametrize("dtype, array", [("I64", np.arange(3)), ("F8_E4M3", np.zeros(3, ml_dtypes.float8_e4m3fn))])
def test_non_float_tensors_are_refused(tmp_path, dtype, array):
    path = tmp_path / "q.safetensors"
    save_safetensors(path, {"w": np.ones(2, np.float32), "scale": array})
    one_line_error(CheckpointError, lambda: SafetensorsFile(path),
                   f"q.safetensors: tensor 'scale' has unsupported dtype '{dtype}'; npvlm reads float weights only")


def test_missing_file_and_folder(tmp_path):
    one_line_error(CheckpointError, lambda: SafetensorsFile(tmp_path / "nope.safetensors"),
                   "nope.safetensors: cannot open the file")
    one_line_error(CheckpointError, lambda: SafetensorsFile(tmp_path), "cannot open the file")
