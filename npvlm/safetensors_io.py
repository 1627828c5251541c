"""Read and write safetensors files with NumPy alone, one tensor at a time.

A safetensors file has three parts (huggingface/safetensors README.md, "Format"):

    [8 bytes]  N, the header size, an unsigned little-endian u64
    [N bytes]  UTF-8 JSON that starts with "{" (may be right-padded with spaces):
               {"__metadata__": {str: str},                           (optional)
                "<name>": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [BEGIN, END]}, ...}
    [rest]     the data: each tensor's bytes, little-endian and row-major, at
               file offset 8 + N + BEGIN (offsets count from the start of the data)

This reader checks the rules of the reference parser (safetensors/src/tensor.rs:
`MAX_HEADER_SIZE`, `read_metadata`, `validate`): header at most 100 MB, `__metadata__` values are
strings, tensors sorted by offset are contiguous from 0 with no holes or overlaps,
END - BEGIN == prod(shape) * itemsize, and the last tensor ends exactly at the end of the file.
It is stricter in two places where the README's rules are not enforced by tensor.rs (v0.8): the
header must start with '{', and a tensor name may not appear twice.
Every failure raises CheckpointError with one line that names the file, the tensor and the problem.

Why not the `safetensors` package? Its NumPy path needs `ml_dtypes` for BF16
(shared/reference/ecosystem.md §1.1). NumPy has no bfloat16, so BF16 is read as uint16 bits and
widened exactly: a bf16 number is the top half of a float32, `(u16.astype(uint32) << 16)
.view(float32)`. Only the requested tensor's bytes are read (seek + readinto into a
preallocated array), so the peak extra memory is about one tensor, never the whole file.

npvlm reads float weights only: F32, F16, BF16 (and F64, which is narrowed to the requested
dtype). Other dtypes (I64, F8_E4M3, ...) are rejected when the file is opened.
"""

import json
import math
import os
import secrets
import struct
import threading

import numpy as np

from npvlm.errors import CheckpointError

MAX_HEADER_SIZE = 100_000_000  # bytes; safetensors/src/tensor.rs `MAX_HEADER_SIZE`

# dtypes npvlm reads (and writes) -> the little-endian NumPy dtype of the stored bits.
_STORED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}
# the other dtypes the format defines (tensor.rs `Dtype`): "unsupported" in messages, not "unknown".
_OTHER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "C64",
                 "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"}
_U64_LIMIT = 2**64
_MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # NumPy's NPY_MAXDIMS


def _label(path):
    """The file as error messages name it: its base name, escaped if it is not plain text."""
    name = os.path.basename(os.fspath(path))
    return name if name.isprintable() else ascii(name)


def _reject_duplicates(pairs):
    """json object_pairs_hook: JSON allows repeated keys, safetensors does not."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")  # Python's json accepts NaN/Infinity; JSON does not


def _is_u64(v):
    return type(v) is int and 0 <= v < _U64_LIMIT  # `type(v) is int` excludes bool (an int subclass)


class SafetensorsFile:
    """One open safetensors file: a validated header plus tensors read on demand.

    with SafetensorsFile("model.safetensors") as f:
        for name in f.keys():
            w = f.read(name)          # float32[shape], C-contiguous, writable

    keys() are in file order (by data offset). Thread-safe reads; close() is idempotent.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._label = _label(self.path)
        self._lock = threading.Lock()
        try:
            self._file = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"{self._label}: cannot open the file ({e.strerror or e})") from None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    # ---- header ----------------------------------------------------------------------------

    def _error(self, what, name=None):
        """The one-line CheckpointError: '<file>: tensor '<name>' <what is wrong>'."""
        where = f"tensor {name!r} " if name is not None else ""
        return CheckpointError(f"{self._label}: {where}{what}")

    def _parse(self):
        file_size = os.fstat(self._file.fileno()).st_size
        if file_size < 8:
            raise self._error(f"file is {file_size} bytes, shorter than the 8-byte header length; "
                              "it is not a safetensors file or it was truncated")
        (n,) = struct.unpack("<Q", self._read_at(0, 8))
        if n > MAX_HEADER_SIZE:
            raise self._error(f"header length {n} is larger than the {MAX_HEADER_SIZE}-byte limit; "
                              "it is not a safetensors file or it is corrupt")
        if 8 + n > file_size:
            raise self._error(f"header length {n} runs past the end of the file ({file_size} bytes); "
                              "it is not a safetensors file or it was truncated")
        raw = self._read_at(8, n)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error(f"header is not valid UTF-8 (byte {e.start}: {e.reason})") from None
        # README: MUST start with '{' (tensor.rs has this check commented out). It also means a
        # successful parse is always a dict: anything after the closing '}' is a JSON error.
        if not text.startswith("{"):
            raise self._error("header is not a JSON object: it must start with '{' "
                              f"but starts with {text[:20]!r}")
        try:
            header = json.loads(text, object_pairs_hook=_reject_duplicates,
                                parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise self._error(f"header is not valid JSON ({str(e).splitlines()[0][:200]})") from None

        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise self._error(f"__metadata__ must be an object of strings, got {type(meta).__name__}")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise self._error(f"__metadata__ value for {k!r} must be a string, "
                                  f"got {type(v).__name__} {v!r:.60}")
        self.metadata = meta

        info = {name: self._parse_entry(name, entry) for name, entry in header.items()}
        # name -> (dtype str, shape tuple, begin, end), in file order (by data offset)
        self._info = dict(sorted(info.items(), key=lambda kv: (kv[1][2], kv[1][3])))
        self._data_start = 8 + n
        self._check_layout(file_size - self._data_start)

    def _parse_entry(self, name, entry):
        if not isinstance(entry, dict):
            raise self._error("entry must be an object with dtype, shape, data_offsets; "
                              f"got {type(entry).__name__}", name)
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                raise self._error(f"has no {field!r}", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise self._error(f"dtype must be a string, got {dtype!r:.60}", name)
        if dtype not in _STORED:
            kind = "unsupported" if dtype in _OTHER_DTYPES else "unknown"
            raise self._error(f"has {kind} dtype {dtype!r:.40}; npvlm reads float weights only "
                              f"({', '.join(_STORED)})", name)
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise self._error(f"shape must be a list of non-negative integers, got {shape!r:.80}", name)
        if len(shape) > _MAX_NDIM:
            raise self._error(f"has {len(shape)} dimensions; NumPy supports at most {_MAX_NDIM}", name)
        # NumPy refuses shapes whose non-zero dims multiply past intp, even when a 0 makes them empty.
        if math.prod(d for d in shape if d) * 8 >= 2**63:
            raise self._error(f"shape {shape} is too large for NumPy", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
            raise self._error("data_offsets must be [begin, end], non-negative integers, "
                              f"got {offsets!r:.80}", name)
        begin, end = offsets
        if end < begin:
            raise self._error(f"data_offsets [{begin}, {end}] end before they begin", name)
        need = math.prod(shape) * _STORED[dtype].itemsize
        if end - begin != need:
            raise self._error(f"shape {shape} {dtype} needs {need} bytes but data_offsets "
                              f"[{begin}, {end}] hold {end - begin}", name)
        return dtype, tuple(shape), begin, end

    def _check_layout(self, data_size):
        """Sorted by offset, tensors must tile [0, data_size) exactly (tensor.rs `validate`)."""
        pos, prev = 0, None  # where the previous tensor ended, and its name
        for name, (_, _, begin, end) in self._info.items():
            span = f"data_offsets [{begin}, {end}]"
            if begin < pos:
                raise self._error(f"{span} overlap tensor {prev!r}, which ends at {pos}", name)
            if begin > pos:
                after = f"after tensor {prev!r}" if prev is not None else "at the start of the data"
                raise self._error(f"{span} leave a hole of {begin - pos} bytes {after}", name)
            if end > data_size:
                raise self._error(f"{span} past the end of the file ({data_size} data bytes); "
                                  "the file may be truncated — download it again", name)
            pos, prev = end, name
        if pos != data_size:
            last = f"tensor {prev!r}" if prev is not None else "the header (no tensors)"
            raise self._error(f"{data_size - pos} extra bytes after {last}: the data section is "
                              f"{data_size} bytes but the tensors cover {pos}; the file is corrupt")

    # ---- queries ---------------------------------------------------------------------------

    def _get(self, name):
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointError(f"{self._label}: no tensor named {name!r}") from None

    def keys(self):
        """Tensor names in file order (by data offset)."""
        return list(self._info)

    def __contains__(self, name):
        return name in self._info

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._info)

    def shape(self, name):
        return self._get(name)[1]

    def dtype(self, name):
        """The stored dtype: "F32", "F16", "BF16" (or "F64")."""
        return self._get(name)[0]

    def nbytes(self, name):
        """Bytes the tensor occupies in the file."""
        _, _, begin, end = self._get(name)
        return end - begin

    # ---- data ------------------------------------------------------------------------------

    def _read_at(self, offset, size, out=None):
        """Read exactly `size` bytes at `offset`, into `out` (a writable buffer) when given."""
        buf = bytearray(size) if out is None else out
        view = memoryview(buf).cast("B")
        with self._lock:
            if self._file.closed:
                raise ValueError(f"{self._label}: read from a closed SafetensorsFile")
            self._file.seek(offset)
            done = 0
            while done < size:  # a raw read may return less than asked (e.g. > 2 GiB on Linux)
                got = self._file.readinto(view[done:])
                if not got:
                    raise self._error(f"file ended at byte {offset + done}, expected {size} bytes "
                                      f"at {offset}; it was truncated or changed while open")
                done += got
        return buf

    def read_raw(self, name):
        """The stored bits as a NumPy array of the stored shape, native byte order:
        F32 -> float32, F16 -> float16, F64 -> float64, BF16 -> uint16 (widen with `bf16_to_f32`).
        Useful to move BF16 to a GPU at half the bytes and widen there."""
        dtype, shape, begin, end = self._get(name)
        stored = _STORED[dtype]
        try:
            arr = np.empty(shape, dtype=stored)
        except (ValueError, MemoryError) as e:
            raise self._error(f"cannot allocate shape {list(shape)} ({e})", name) from None
        if end > begin:
            self._read_at(self._data_start + begin, end - begin, out=arr)
        if not stored.isnative:  # big-endian host: swap in place, no copy
            arr = arr.byteswap(inplace=True).view(stored.newbyteorder("="))
        return arr

    def read(self, name, dtype=np.float32):
        """The tensor as a C-contiguous writable array of its stored shape, in `dtype`
        (float32 by default; float16/float64 also accepted). BF16 is widened exactly."""
        want = np.dtype(dtype)
        if want.kind != "f":
            raise ValueError(f"read() returns floating arrays; dtype {want} is not one")
        raw = self.read_raw(name)
        if self.dtype(name) == "BF16":
            raw = bf16_to_f32(raw)
        return raw if raw.dtype == want else raw.astype(want)

    # ---- lifetime --------------------------------------------------------------------------

    def close(self):
        with self._lock:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._file.closed else f"{len(self._info)} tensors"
        return f"SafetensorsFile({self.path!r}, {state})"


# ---- bf16 <-> fp32 ------------------------------------------------------------------------------

def bf16_to_f32(bits):
    """uint16[...] bfloat16 bits -> float32[...], exact (bf16 is the top half of an fp32)."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.copyto(out, bits, casting="safe")  # no temporary: peak is the uint16 input + this output
    out <<= 16
    return out.view(np.float32)


def f32_to_bf16(x):
    """float32[...] -> uint16[...] bfloat16 bits, round to nearest even (as torch `.to(bfloat16)`).
    NaN stays NaN (the quiet bit is set so a NaN payload in the dropped half cannot become inf)."""
    f = np.array(x, dtype=np.float32, order="C")  # a copy; np.ascontiguousarray would make 0-d 1-d
    u = f.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16  # no uint32 overflow below NaN bits
    nan = (u >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(f), nan, rounded).astype(np.uint16)


# ---- writer -------------------------------------------------------------------------------------

_FROM_NUMPY = {("f", 4): "F32", ("f", 2): "F16", ("f", 8): "F64"}  # (kind, itemsize), any byte order


def _stored_bytes(arr, dtype):
    """The array converted to the stored little-endian layout, as a C-contiguous array."""
    if dtype == "BF16":
        return f32_to_bf16(arr).astype("<u2", copy=False)
    return np.ascontiguousarray(arr, dtype=_STORED[dtype])


def write_safetensors(path, tensors, metadata=None, dtype=None):
    """Write {name: float array} to `path` as safetensors, atomically (temp file + os.replace).

    dtype: None keeps each array's dtype (float32 -> F32, float16 -> F16, float64 -> F64);
    "F32", "F16" or "BF16" converts every tensor (BF16 rounds fp32 to nearest even; float64
    input is first rounded to fp32); a dict
    {name: dtype} chooses per tensor. metadata: {str: str}, stored as __metadata__.
    Tensors are stored in the dict's order; the header is padded with spaces to 8 bytes.
    """
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    layout, offset = {}, 0
    for name, arr in arrays.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is not allowed")
        want = dtype.get(name) if isinstance(dtype, dict) else dtype
        want = want or _FROM_NUMPY.get((arr.dtype.kind, arr.dtype.itemsize))
        if want not in _STORED or arr.dtype.kind != "f":
            raise ValueError(f"tensor {name!r}: cannot store a {arr.dtype} array as {want}")
        size = arr.size * _STORED[want].itemsize
        layout[name] = {"dtype": want, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map strings to strings")
        layout = {"__metadata__": dict(metadata), **layout}
    header = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)

    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, arr in arrays.items():  # one converted tensor in memory at a time
                stored = _stored_bytes(arr, layout[name]["dtype"]).reshape(-1)
                f.write(memoryview(stored).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
