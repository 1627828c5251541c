"""Weights kept in bfloat16 (half the memory), widened to fp32 block by block where they are used.

`npvlm.load(path, weights="bf16")` keeps every matrix that is multiplied (the linear layers, the
patch embedding, the tied token embedding / lm_head) as bfloat16 bit patterns: uint16, half the
bytes of fp32, so the 3B-224 model needs ~5.9 GB instead of ~11.7 GB. The arithmetic stays fp32:

    x @ W^T  ->  for each block of W's rows: widen the block into a reused fp32 buffer
                 (exactly: a bf16 is the top 16 bits of an fp32), then BLAS on that block

and an embedding lookup (`table[ids]`) widens just the rows it gathers. The official checkpoints are BF16, so
the weights are then exactly the fp32 mode's, and the results equal it up to the summation order
of a blocked product (each output column is still one BLAS dot product over the full input);
an F32 or F16 checkpoint is rounded to bf16 on load (round to nearest even, as torch does).

What it costs (docs/performance.md): the widening is an extra pass over the weights in NumPy,
so decoding, which is bound by reading weights, runs at about half the fp32 speed, and a prefill
(matrix-matrix products that reuse each widened block for every prompt row) about 15-20% slower.
NumPy backend only: a GPU holds the 3B model in fp32 easily.

Axis legend: O output features (rows of W), I input features, R rows of x.
"""

import threading

import numpy as np

from .safetensors_io import bf16_to_f32

# Rows of W widened at a time: 2^18 elements = a 1 MB fp32 buffer (128 rows of a 2048-wide
# matrix, 16 of a 16384-wide one), small enough to stay in a core's L2 cache between the widening
# and the product. Measured on the 2-core test machine (decode of a 1.9 GB model): 0.26-0.5 MB
# blocks ~30-50% slower (per-call overhead); 1 MB ~95-100 ms/step in every round; 2-17 MB blocks
# sometimes as fast, sometimes 3-4x slower (the buffer then lives in the shared L3 / memory).
BLOCK_ELEMENTS = 1 << 18
# A product with many rows (a prefill: every prompt token) reuses each widened block R times, so
# the widening is cheap there and what matters is that BLAS gets large blocks: up to 2^25
# elements (128 MB fp32, the whole of a 3B MLP matrix) when x has at least GEMM_ROWS rows.
GEMM_ROWS = 16
GEMM_BLOCK_ELEMENTS = 1 << 25


class BF16Matrix:
    """A weight matrix [O, I] stored as bfloat16 bits (uint16), used as fp32."""

    def __init__(self, bits):
        if bits.dtype != np.uint16 or bits.ndim != 2:
            raise TypeError(f"BF16Matrix needs uint16[O, I] bits, got {bits.dtype}{list(bits.shape)}")
        self.bits = bits

    @property
    def shape(self):
        return self.bits.shape

    @property
    def ndim(self):
        return 2

    @property
    def nbytes(self):
        return self.bits.nbytes

    @property
    def dtype(self):
        """The dtype it is used as (an fp32 array's, for code that asks)."""
        return np.dtype(np.float32)

    def to_f32(self):
        """The whole matrix widened: float32[O, I] (exact)."""
        return bf16_to_f32(self.bits)

    def __getitem__(self, ids):
        """Rows widened, as indexing an fp32 matrix gives them: `W[ids]` -> float32[..., I]
        (an embedding lookup; `ids` int[...] or a slice)."""
        return bf16_to_f32(self.bits[ids])

    def __repr__(self):
        return f"BF16Matrix({list(self.shape)}, {self.nbytes / 1e6:.1f} MB)"


_local = threading.local()


def _buffer(size):
    """A uint32 scratch buffer of `size` elements, reused across calls (one per thread,
    grown when a product needs more): allocating it per product cost page faults on every call
    (measured: decoding 4x slower)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, dtype=np.uint32)
    return buf[:size]


def matmul_t(x, w):
    """x @ W^T for W an fp32 array or a BF16Matrix.  [..., I] -> [..., O]"""
    if not isinstance(w, BF16Matrix):
        return x @ w.T
    O, I = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, I)                                        # [R, I]
    out = np.empty((x2.shape[0], O), dtype=np.float32)           # [R, O]
    limit = GEMM_BLOCK_ELEMENTS if x2.shape[0] >= GEMM_ROWS else BLOCK_ELEMENTS
    rows = max(1, min(O, limit // I))
    buf = _buffer(rows * I).reshape(rows, I)
    for lo in range(0, O, rows):
        hi = min(lo + rows, O)
        block = buf[:hi - lo]
        np.copyto(block, w.bits[lo:hi], casting="safe")
        block <<= 16                                             # bf16 bits -> fp32 bits
        np.matmul(x2, block.view(np.float32).T, out=out[:, lo:hi])
    return out.reshape(*lead, O)
