"""Reading safetensors files: a thin wrapper over the `safetensors` package.

The format (huggingface/safetensors README, "Format"): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}`
(plus an optional string-valued `__metadata__`), then every tensor's bytes, row-major and
little-endian. The package checks the header in Rust (length, JSON, offsets that tile the data
exactly) and reads one tensor at a time; with ml_dtypes installed it returns BF16 as
`ml_dtypes.bfloat16`, which widens to fp32 exactly. What this module adds: every failure
becomes one `CheckpointError` line naming the file (and the tensor, where one is to blame), and
only float tensors are accepted.

Reads go through `pread` rather than a memory map: a mapped file's pages count as the process's
own memory while it is open, which would add the checkpoint's size to the peak (measured,
docs/performance.md).
"""

import json
import os
import struct

import ml_dtypes  # noqa: F401 (registers bfloat16 with NumPy: the package needs it to read BF16)
import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")

# the package's error text -> what it means for the user
_REASONS = [
    ("header too small", "the file is shorter than the 8-byte header length; it is not a "
                         "safetensors file or it was truncated: download it again"),
    ("header too large", "header length is larger than the 100000000-byte limit; it is not a "
                         "safetensors file or it is corrupt"),
    ("invalid header length", "header length runs past the end of the file; it is not a "
                              "safetensors file or it was truncated: download it again"),
    ("JSON", "header is not valid JSON; the file is corrupt: download it again"),
    ("invalid offset", "data_offsets overlap another tensor or leave a hole; the file is corrupt: "
                       "download it again"),
    ("invalid shape", "shape, dtype and data_offsets disagree; the file is corrupt: download it again"),
    ("incomplete metadata", "the tensors do not cover the data exactly; the file is truncated or "
                            "corrupt: download it again"),
]


class SafetensorsFile:
    """One checked safetensors file; tensors are read on demand.

    with SafetensorsFile(path) as f:
        f.keys(), f.shape(name), f.dtype(name) ("F32", "BF16", ...), f.nbytes(name)
        f.read(name)        float32 array (BF16 widened exactly)
        f.read_bits(name)   a BF16 tensor's bits, uint16
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.label = os.path.basename(self.path)
        try:
            try:
                self._file = safe_open(self.path, framework="np", backend="pread")
            except TypeError:          # safetensors < 0.8 has memory-mapped reads only
                self._file = safe_open(self.path, framework="np")
        except SafetensorError as e:
            raise CheckpointError(f"{self.label}: {self._reason(str(e))}") from None
        except OSError as e:
            raise CheckpointError(f"{self.label}: cannot open the file ({e.strerror or e})") from None
        self._info = {}
        for name in self._file.keys():
            piece = self._file.get_slice(name)
            self._info[name] = (piece.get_dtype(), tuple(piece.get_shape()))
            if self._info[name][0] not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.label}: tensor {name!r} has unsupported dtype "
                                      f"{self._info[name][0]!r}; npvlm reads float weights only "
                                      f"({', '.join(FLOAT_DTYPES)})")

    def _reason(self, message):
        """The package's message in the user's terms, naming the tensor to blame if there is one."""
        reason = next((ours for words, ours in _REASONS if words in message), message)
        if _named_tensor(message):
            return f"tensor {_named_tensor(message)!r}: {reason}"
        if message.endswith(("for tensor", "not fully covered")):     # which tensor, it does not say
            return _inconsistent_tensor(self.path) or reason
        return reason

    def keys(self):
        return list(self._info)

    def shape(self, name):
        return self._info[name][1]

    def dtype(self, name):
        return self._info[name][0]

    def nbytes(self, name):
        return int(np.prod(self.shape(name))) * np.dtype(_NUMPY[self.dtype(name)]).itemsize

    def _get(self, name):
        try:
            return self._file.get_tensor(name)
        except SafetensorError as e:       # e.g. the file changed on disk since it was opened
            raise CheckpointError(f"{self.label}: tensor {name!r}: {e}") from None

    def read(self, name):
        """The tensor as a writable float32 array of its stored shape (BF16, F16 widened exactly)."""
        return self._get(name).astype(np.float32)

    def read_bits(self, name):
        """A BF16 tensor's stored bits, uint16 (to keep it in bfloat16: npvlm/bf16.py)."""
        return self._get(name).view(np.uint16)

    def close(self):
        self._file.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_NUMPY = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "F64": np.float64}


def _named_tensor(message):
    """The tensor a package message names in backquotes (`invalid offset for tensor `a``)."""
    return message.split("`")[1] if message.count("`") >= 2 else None


def _inconsistent_tensor(path):
    """For a refused file whose message names no tensor: the first tensor whose data runs past
    the end of the file, or whose byte count does not fit its shape and dtype, in words."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))          # the package has parsed this header already
            data = os.fstat(f.fileno()).st_size - 8 - n
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            if end > data:
                return (f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the "
                        f"file ({data} data bytes); the file may be truncated: download it again")
            itemsize = _ITEMSIZE.get(t["dtype"])
            if itemsize and end - begin != itemsize * int(np.prod(t["shape"])):
                return (f"tensor {name!r}: shape {t['shape']} {t['dtype']} needs "
                        f"{itemsize * int(np.prod(t['shape']))} bytes but data_offsets hold "
                        f"{end - begin}; the file is corrupt: download it again")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        pass
    return None


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
