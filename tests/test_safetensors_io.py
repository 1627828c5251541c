"""Tests for npvlm/safetensors_io.py: round trips against the official `safetensors` package,
bf16 rounding against torch, one test per malformed-file rule, and a fuzz test that nothing but
CheckpointError escapes the reader."""

import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npvlm.errors import CheckpointError
from npvlm.safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors

RNG = np.random.default_rng(0)


def _f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


# fp32 values where bf16 rounding bites: ties to even (down and up), the largest finite fp32
# (rounds to inf), the largest value that rounds to bf16 max, subnormals, signed zero, inf.
EDGE_F32 = np.concatenate([
    _f32([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # 1+2^-8 tie -> 1.0; next tie -> up
          0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,  # fp32 max -> inf; bf16-max region
          0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF,  # subnormals and their ties
          0x00000000, 0x80000000, 0x7F800000, 0xFF800000]),
    np.array([1.0, -1.0, 0.1, -3.14159, 65504.0, 1e-38, 3e38], np.float32),
])


def _sample_tensors(np_dtype=np.float32):
    with np.errstate(over="ignore"):  # 3e38 -> inf in float16, on purpose
        return {k: v.astype(np_dtype) for k, v in _sample_tensors_f32().items()}


def _sample_tensors_f32():
    return {
        "vision.patch.weight": RNG.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "bias": RNG.standard_normal(5).astype(np.float32),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "edges": EDGE_F32.copy(),
    }


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
def test_reads_files_written_by_official_numpy_writer(tmp_path, np_dtype):
    official = pytest.importorskip("safetensors.numpy")
    tensors = _sample_tensors(np_dtype)
    path = tmp_path / "official.safetensors"
    official.save_file(tensors, str(path), metadata={"format": "np"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"format": "np"}
        for name, want in tensors.items():
            assert f.dtype(name) == {np.float32: "F32", np.float16: "F16"}[np_dtype]
            assert f.shape(name) == want.shape
            assert f.nbytes(name) == want.nbytes
            got = f.read(name)
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
            assert got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, want.astype(np.float32))  # exact, inf included
            assert f.read_raw(name).tobytes() == want.tobytes()


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
def test_official_reader_reads_our_files(tmp_path, np_dtype):
    official = pytest.importorskip("safetensors.numpy")
    tensors = _sample_tensors(np_dtype)
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors, metadata={"who": "npvlm"})
    loaded = official.load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, want in tensors.items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape
        assert loaded[name].tobytes() == want.tobytes()
    with SafetensorsFile(path) as f:
        assert f.keys() == list(tensors)  # our writer stores in dict order; keys() is file order
        assert f.metadata == {"who": "npvlm"}


def test_bf16_widening_matches_torch_bit_for_bit(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    all_bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    tensors = {
        "every_bf16_value": all_bits,  # all 65536 patterns: NaNs, infs, subnormals, -0
        "matrix": torch.randn(7, 5).to(torch.bfloat16),
        "scalar": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    path = tmp_path / "bf16.safetensors"
    st_torch.save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        for name, t in tensors.items():
            assert f.dtype(name) == "BF16"
            got = f.read(name)
            want = t.float().numpy()
            assert got.dtype == np.float32 and got.shape == tuple(t.shape) and got.flags.writeable
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
            assert f.read_raw(name).dtype == np.uint16


def test_bf16_writer_rounds_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    random_bits = RNG.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([EDGE_F32, _f32(random_bits), RNG.standard_normal(5000).astype(np.float32)])
    values = values[~np.isnan(values)]  # NaN payloads differ between torch kernels; checked below
    want = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(values), want)

    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, {"v": values.reshape(-1, 7)[:100], "s": np.float32(1 + 2**-8)}, dtype="BF16")
    loaded = st_torch.load_file(str(path))
    assert loaded["v"].dtype == torch.bfloat16
    expected = torch.from_numpy(values.reshape(-1, 7)[:100]).to(torch.bfloat16)
    np.testing.assert_array_equal(loaded["v"].view(torch.int16).numpy(), expected.view(torch.int16).numpy())
    assert loaded["s"].item() == 1.0  # a tie rounds to the even neighbour


def test_bf16_nan_stays_nan():
    nans = _f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF])  # incl. payload-only NaNs
    widened = bf16_to_f32(f32_to_bf16(nans))
    assert np.isnan(widened).all()


def test_bf16_round_trip_is_exact_for_bf16_values():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    widened = bf16_to_f32(bits)
    finite = ~np.isnan(widened)
    np.testing.assert_array_equal(f32_to_bf16(widened)[finite], bits[finite])


def test_f64_is_accepted_and_converted(tmp_path):
    x = RNG.standard_normal((3, 2))
    write_safetensors(tmp_path / "f64.safetensors", {"x": x})
    with SafetensorsFile(tmp_path / "f64.safetensors") as f:
        assert f.dtype("x") == "F64"
        np.testing.assert_array_equal(f.read("x"), x.astype(np.float32))
        np.testing.assert_array_equal(f.read("x", dtype=np.float64), x)


def test_read_dtype_option(tmp_path):
    x = RNG.standard_normal((4, 4)).astype(np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"x": x}, dtype="BF16")
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        assert f.read("x", dtype=np.float64).dtype == np.float64
        assert f.read("x", dtype=np.float16).dtype == np.float16
        with pytest.raises(ValueError, match="floating"):
            f.read("x", dtype=np.int32)


def test_per_tensor_dtype_and_header_alignment(tmp_path):
    x = RNG.standard_normal(3).astype(np.float32)
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, {"a": x, "b": x, "c": x}, dtype={"a": "BF16", "b": "F16"})
    with SafetensorsFile(path) as f:
        assert [f.dtype(k) for k in f.keys()] == ["BF16", "F16", "F32"]
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    assert n % 8 == 0  # padded with spaces, as the official writer does


# ---- reading behaviour ---------------------------------------------------------------------------

def test_reads_only_one_tensor_worth_of_memory(tmp_path):
    big = {f"w{i}": np.full((512, 1024), i, np.float32) for i in range(4)}  # 2 MiB each as fp32
    path = tmp_path / "big.safetensors"
    write_safetensors(path, big, dtype="BF16")  # 4 MiB file
    fp32_size = 512 * 1024 * 4
    with SafetensorsFile(path) as f:
        tracemalloc.start()
        try:
            w2 = f.read("w2")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (w2 == 2).all()
    # output fp32 + the raw bf16 bits = 1.5x one tensor; a whole-file read would add 4 MiB.
    assert peak < 1.7 * fp32_size, peak


def test_queries_and_lifetime(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": np.ones(2, np.float32)})
    f = SafetensorsFile(path)
    assert "a" in f and "b" not in f and len(f) == 1 and list(f) == ["a"]
    assert f.metadata == {} and os.fspath(f.path) == os.fspath(path)
    with pytest.raises(CheckpointError, match="m.safetensors: no tensor named 'b'"):
        f.shape("b")
    f.close()
    f.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        f.read("a")


def test_keys_are_in_data_order(tmp_path):
    data = np.arange(3, dtype=np.float32).tobytes()
    header = {"z": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = _write(tmp_path, _file(dict(reversed(header.items())), data))
    with SafetensorsFile(path) as f:
        assert f.keys() == ["z", "a"]
        np.testing.assert_array_equal(f.read("a"), [1.0, 2.0])


def test_header_padding_with_spaces_is_accepted(tmp_path):
    header = json.dumps({"a": _t(shape=[])}).encode() + b"   \n  "
    path = _write(tmp_path, _file(None, np.float32(7).tobytes(), raw_header=header))
    with SafetensorsFile(path) as f:
        assert f.read("a") == 7.0


def test_truncated_after_open_raises_checkpoint_error(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.ones(100, np.float32)})
    with SafetensorsFile(path) as f:
        os.truncate(path, os.path.getsize(path) - 10)
        with pytest.raises(CheckpointError, match="truncated or changed"):
            f.read("a")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: cannot open"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsFile(tmp_path)


def test_write_is_atomic_and_cleans_up(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="cannot store"):
        write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.ones(3, np.int64)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temp file left behind
    with pytest.raises(ValueError, match="strings"):
        write_safetensors(path, {"a": np.ones(1, np.float32)}, metadata={"n": 1})


# ---- malformed files -------------------------------------------------------------------------------

def _file(header, data=b"", raw_header=None, length=None):
    """Bytes of a safetensors file: u64 length, header (a dict as JSON, or raw bytes), data."""
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def _write(tmp_path, content, name="model-00001-of-00002.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _t(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


F4 = b"\0" * 4
NOT_NONNEG = "shape must be a list of non-negative integers"
NOT_PAIR = "data_offsets must be [begin, end]"
DUPLICATE = b'{"a": %s, "a": %s}' % ((json.dumps(_t()).encode(),) * 2)
DEEP = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
# (id, file bytes, expected message fragment, does the official parser reject it too?)
# Where the official parser is more lenient, the comment says why we are strict.
MALFORMED = [
    ("empty-file", b"", "0 bytes, shorter than the 8-byte header length", True),
    ("short-file", b"\x05\0\0", "3 bytes, shorter than the 8-byte", True),
    ("header-past-end", _file(None, raw_header=b"{}", length=1000),
     "header length 1000 runs past the end", True),
    ("header-too-large", _file(None, raw_header=b"{}", length=100_000_001),
     "larger than the 100000000-byte limit", True),
    ("invalid-utf8", _file(None, raw_header=b'{"a\xff": 1}'), "not valid UTF-8", True),
    ("invalid-json", _file(None, raw_header=b'{"a": }'), "not valid JSON", True),
    ("trailing-garbage", _file(None, raw_header=b"{}x"), "not valid JSON", True),
    ("nan-literal", _file(None, raw_header=b'{"__metadata__": {"a": NaN}}'), "not valid JSON", True),
    ("deep-nesting", _file(None, raw_header=DEEP), "not valid JSON", True),
    ("header-is-list", _file([1, 2]), "header is not a JSON object", True),
    # the README says the header MUST start with '{'; tensor.rs has that check commented out.
    ("header-leading-space", _file(None, raw_header=b" {}"), "must start with '{'", False),
    ("empty-header", _file(None, raw_header=b""), "must start with '{'", True),
    # the README forbids duplicate names; the official parser silently keeps the last one.
    ("duplicate-key", _file(None, F4, raw_header=DUPLICATE), "duplicate key 'a'", False),
    ("metadata-not-string", _file({"__metadata__": {"format": 1}}),
     "__metadata__ value for 'format' must be a string", True),
    ("metadata-not-object", _file({"__metadata__": ["a"]}), "__metadata__ must be an object", True),
    ("entry-not-object", _file({"x.weight": 5}), "tensor 'x.weight' entry must be an object", True),
    ("missing-dtype", _file({"x.weight": {"shape": [1], "data_offsets": [0, 4]}}, F4),
     "tensor 'x.weight' has no 'dtype'", True),
    ("missing-shape", _file({"x.weight": {"dtype": "F32", "data_offsets": [0, 4]}}, F4),
     "has no 'shape'", True),
    ("missing-offsets", _file({"x.weight": {"dtype": "F32", "shape": [1]}}, F4),
     "has no 'data_offsets'", True),
    ("dtype-not-string", _file({"x.weight": _t(dtype=4)}, F4),
     "tensor 'x.weight' dtype must be a string", True),
    ("invalid-dtype", _file({"x.weight": _t(dtype="F33")}, F4),
     "tensor 'x.weight' has unknown dtype 'F33'", True),
    # valid safetensors, but npvlm reads float weights only
    ("dtype-i64", _file({"x.weight": _t(dtype="I64", offsets=(0, 8))}, F4 * 2),
     "tensor 'x.weight' has unsupported dtype 'I64'", False),
    ("dtype-f8", _file({"x.weight": _t(dtype="F8_E4M3", offsets=(0, 1))}, b"\0"),
     "unsupported dtype 'F8_E4M3'", False),
    ("shape-offset-mismatch", _file({"x.weight": _t(shape=(2, 3), offsets=(0, 20))}, F4 * 5),
     "tensor 'x.weight' shape [2, 3] F32 needs 24 bytes but data_offsets [0, 20] hold 20", True),
    ("truncated", _file({"x.weight": _t(shape=(25,), offsets=(0, 100))}, F4 * 24),
     "tensor 'x.weight' data_offsets [0, 100] past the end of the file (96 data bytes); "
     "the file may be truncated", True),
    ("overlap", _file({"a": _t(shape=(2,), offsets=(0, 8)), "b": _t(shape=(2,), offsets=(4, 12))}, F4 * 3),
     "tensor 'b' data_offsets [4, 12] overlap tensor 'a', which ends at 8", True),
    ("same-offsets", _file({"a": _t(), "b": _t()}, F4), "overlap tensor 'a'", True),
    ("hole", _file({"a": _t(), "b": _t(offsets=(8, 12))}, F4 * 3),
     "tensor 'b' data_offsets [8, 12] leave a hole of 4 bytes after tensor 'a'", True),
    ("hole-at-start", _file({"a": _t(offsets=(4, 8))}, F4 * 2),
     "hole of 4 bytes at the start of the data", True),
    ("extra-bytes", _file({"a": _t()}, F4 * 2), "4 extra bytes after tensor 'a'", True),
    ("extra-bytes-no-tensors", _file({}, F4), "4 extra bytes after the header (no tensors)", True),
    ("negative-shape", _file({"a": _t(shape=(-1,))}, F4), "tensor 'a' " + NOT_NONNEG, True),
    ("float-shape", _file({"a": _t(shape=(1.0,))}, F4), NOT_NONNEG, True),
    ("string-shape", _file({"a": _t(shape="1")}, F4), NOT_NONNEG, True),
    ("bool-shape", _file({"a": _t(shape=(True,))}, F4), NOT_NONNEG, True),
    ("huge-shape", _file({"a": _t(shape=(2**64,))}, F4), NOT_NONNEG, True),
    # valid safetensors that NumPy cannot represent, even as an empty array
    ("too-many-dims", _file({"a": _t(shape=(1,) * 65)}, F4), "has 65 dimensions", False),
    ("empty-but-numpy-too-large", _file({"a": _t(shape=(0, 2**62), offsets=(0, 0))}),
     "too large for NumPy", False),
    ("offsets-one-number", _file({"a": _t(offsets=[4])}, F4), NOT_PAIR, True),
    ("offsets-negative", _file({"a": _t(offsets=(-4, 0))}, F4), NOT_PAIR, True),
    ("offsets-float", _file({"a": _t(offsets=(0.0, 4))}, F4), NOT_PAIR, True),
    ("offsets-reversed", _file({"a": _t(shape=(0,), offsets=(4, 0))}, F4), "end before they begin", True),
]


@pytest.mark.parametrize("content, fragment, official_rejects",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_file_raises_one_line_checkpoint_error(tmp_path, content, fragment, official_rejects):
    path = _write(tmp_path, content)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert message.startswith("model-00001-of-00002.safetensors: ")
    assert fragment in message
    assert "\n" not in message
    try:  # our rules mirror the reference parser's, except where MALFORMED says otherwise
        import safetensors  # noqa: PLC0415
    except ImportError:
        return
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            f.keys()
        rejected = False
    except Exception:
        rejected = True
    assert rejected == official_rejects


def test_message_escapes_odd_tensor_names(tmp_path):
    path = _write(tmp_path, _file({"bad\nname": _t(dtype="I8", offsets=(0, 1))}, b"\0"))
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert "\n" not in str(info.value) and "'bad\\nname'" in str(info.value)


# ---- fuzzing ------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _open_and_read_all(path):
    """Nothing but CheckpointError may escape; a file that opens must read in full."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return False
    with f:
        for name in f.keys():
            x = f.read(name)
            assert x.dtype == np.float32 and x.shape == f.shape(name)
    return True


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(fuzz_dir, content):
    path = fuzz_dir / "random.safetensors"
    path.write_bytes(content)
    _open_and_read_all(path)


def _valid_file():
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(1.0),
               "c": np.zeros(0, np.float32), "d": np.ones(3, np.float32)}
    header = {"__metadata__": {"format": "np"}}
    data, offset = b"", 0
    for dtype, (name, arr) in zip(["F32", "BF16", "F16", "BF16"], tensors.items()):
        raw = {"F32": arr.astype("<f4").tobytes(), "F16": arr.astype("<f2").tobytes(),
               "BF16": f32_to_bf16(arr).astype("<u2").tobytes()}[dtype]
        header[name] = _t(dtype, list(arr.shape), (offset, offset + len(raw)))
        data, offset = data + raw, offset + len(raw)
    return _file(header, data)


VALID = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


def test_valid_fuzz_seed_opens(tmp_path):
    assert _open_and_read_all(_write(tmp_path, VALID))


# mostly digits and letters, so the JSON often stays valid while numbers, names and dtypes change
BYTE = st.sampled_from(b"0123456789abcdFB") | st.integers(0, 255)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, HEADER_END - 1), BYTE), min_size=1, max_size=3),
       st.sampled_from([0, 0, 0, -1, -4, 4, 8]))
def test_fuzz_mutated_header_bytes(fuzz_dir, edits, resize):
    content = bytearray(VALID)
    for pos, value in edits:
        content[pos] = value
    content = content[:len(content) + resize] if resize < 0 else content + b"\0" * resize
    path = fuzz_dir / "mutated.safetensors"
    path.write_bytes(bytes(content))
    _open_and_read_all(path)


DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E4M3"])
JSON_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                       st.text(max_size=8), DTYPE_NAMES)
JSON_VALUES = st.recursive(
    JSON_ATOMS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(st.sampled_from(["a", "b", "c", "d", "__metadata__"]),
       st.sampled_from([None, "dtype", "shape", "data_offsets"]),
       JSON_VALUES | st.lists(st.integers(0, 40), max_size=4),
       st.integers(-4, 4))
def test_fuzz_mutated_header_values(fuzz_dir, name, field, value, resize):
    header = json.loads(VALID[8:HEADER_END])
    if field is None or not isinstance(header[name], dict):
        header[name] = value
    else:
        header[name][field] = value
    data = VALID[HEADER_END:]
    data = data[:len(data) + resize] if resize < 0 else data + b"\0" * resize
    path = fuzz_dir / "values.safetensors"
    path.write_bytes(_file(header, data))
    _open_and_read_all(path)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda k: k != "__metadata__"),
                       st.tuples(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                                 st.sampled_from(["F32", "F16", "BF16"])),
                       max_size=5),
       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_fuzz_valid_files_round_trip(fuzz_dir, specs, metadata):
    rng = np.random.default_rng(len(specs))
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in specs.items()}
    dtypes = {name: dtype for name, (_, dtype) in specs.items()}
    path = fuzz_dir / "valid.safetensors"
    write_safetensors(path, tensors, metadata=metadata, dtype=dtypes)
    with SafetensorsFile(path) as f:
        assert f.keys() == list(tensors) and f.metadata == metadata
        for name, x in tensors.items():
            want = {"F32": x, "F16": x.astype(np.float16).astype(np.float32),
                    "BF16": bf16_to_f32(f32_to_bf16(x))}[dtypes[name]]
            got = f.read(name)
            assert got.shape == x.shape and got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
