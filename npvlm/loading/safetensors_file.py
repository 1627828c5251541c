"""Reading safetensors files: a thin wrapper over the `safetensors` package.

The format (huggingface/safetensors README, "Format"): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}`
(plus an optional string-valued `__metadata__`), then every tensor's bytes, row-major and
little-endian. The package checks the header in Rust (length, JSON, dtypes and shapes against
offsets that tile the data exactly) and gives the tensor names, dtypes and shapes. What this
module adds: every failure becomes one `CheckpointError` line naming the file (and the tensor,
where one is to blame); only float tensors are accepted; and each tensor's bytes, at the offsets
the package has checked, are read straight into the array that keeps them (`readinto`), one
tensor at a time. BF16 widens to fp32 exactly: its 16 bits are the top half of an fp32
(npvlm/loading/bf16.py).

Why not the package's own `get_tensor`: its `pread` path copies each tensor twice, and its
memory map keeps a whole shard's pages in the process on top of the weights (the measurements:
docs/performance.md, "Loading").
"""

import json
import os
import struct

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .bf16 import bf16_to_f32

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
        f.keys(), f.shape(name), f.dtype(name) ("F32", "BF16", ...), f.nbytes(name), f.metadata
        f.read(name)        float32 array (BF16 widened exactly)
        f.read_bits(name)   a BF16 tensor's bits, uint16
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.label = os.path.basename(self.path)
        try:
            with safe_open(self.path, framework="np") as checked:       # the package's checks
                pieces = {name: checked.get_slice(name) for name in checked.keys()}
                self._info = {name: (p.get_dtype(), tuple(p.get_shape())) for name, p in pieces.items()}
                self.metadata = checked.metadata()                       # the header's __metadata__
        except SafetensorError as e:
            raise CheckpointError(f"{self.label}: {self._reason(str(e))}") from None
        except OSError as e:
            raise CheckpointError(f"{self.label}: cannot open the file ({e.strerror or e})") from None
        for name, (dtype, _) in self._info.items():
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.label}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                      f"npvlm reads float weights only ({', '.join(FLOAT_DTYPES)})")
        self._file = open(self.path, "rb", buffering=0)
        (n,) = struct.unpack("<Q", self._file.read(8))
        self._start = {name: 8 + n + entry["data_offsets"][0]        # offsets the package checked
                       for name, entry in json.loads(self._file.read(n)).items() if name in self._info}

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
        return int(np.prod(self.shape(name))) * _NUMPY[self.dtype(name)].itemsize

    def _get(self, name):
        """The stored tensor, in a fresh array of its stored dtype (BF16 as its uint16 bits)."""
        out = np.empty(self.shape(name), dtype=_NUMPY[self.dtype(name)])
        self._file.seek(self._start[name])
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < out.nbytes:          # a raw read may return less than asked
            got = self._file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.label}: tensor {name!r}: the file ended early; it "
                                      "changed while it was being read")
            done += got
        return out

    def read(self, name):
        """The tensor as a writable float32 array of its stored shape (BF16, F16 widened exactly)."""
        x = self._get(name)
        if self.dtype(name) == "BF16":
            return bf16_to_f32(x)
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def read_bits(self, name):
        """A BF16 tensor's stored bits, uint16 (to keep it in bfloat16: npvlm/loading/bf16.py)."""
        return self._get(name)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_NUMPY = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8")}


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
