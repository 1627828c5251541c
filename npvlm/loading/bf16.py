"""Weights kept in bfloat16 (half the memory), widened to fp32 block by block where they are used.

`npvlm.load(path, weights="bf16")` keeps every matrix that is multiplied (the linear layers, the
patch embedding, the tied token embedding / lm_head) as a `BF16Matrix`: bfloat16 bit patterns
(uint16), half the bytes of fp32, so the 3B-224 model needs ~5.9 GB instead of ~11.7 GB. It
behaves like an fp32 matrix where the model math uses one, so that math never asks which it has:

    x @ W.T      for each block of W's rows: widen the block into a reused fp32 buffer (exactly:
                 a bf16 is the top 16 bits of an fp32), then BLAS on that block
    x @ W        the same, accumulating over the blocks (a backward pass: dx = dy W)
    W[ids]       an embedding lookup widens just the rows it gathers

The official checkpoints are BF16, so the weights are then exactly the fp32 mode's, and the
results equal it up to the summation order of a blocked product (each output of `x @ W.T` is
still one BLAS dot product over the full input). An F32 or F16 checkpoint is rounded to bf16 on
load (round to nearest even, as torch does). NumPy backend only: a GPU holds the 3B model in fp32.
What it costs, and how the block sizes were chosen: docs/performance.md.

Axes: O output features (rows of W), I input features, R rows of x.
"""

import threading

import numpy as np

# Rows of W widened at a time: 2^18 elements = a 1 MB fp32 buffer, small enough to stay in a
# core's L2 cache between the widening and the product (the measurements: docs/performance.md).
BLOCK_ELEMENTS = 1 << 18
# A product with many rows (a prefill: every prompt token) reuses each widened block R times, so
# there BLAS gets large blocks: up to 2^25 elements (128 MB fp32) when x has >= GEMM_ROWS rows.
GEMM_ROWS = 16
GEMM_BLOCK_ELEMENTS = 1 << 25


def bf16_to_f32(bits):
    """uint16[...] bfloat16 bits -> float32[...], exact (bf16 is the top half of an fp32)."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.copyto(out, bits, casting="safe")  # no temporary: peak is the uint16 input + this output
    out <<= 16
    return out.view(np.float32)


def f32_to_bf16(x):
    """float32[...] -> uint16[...] bfloat16 bits, round to nearest even (as torch `.to(bfloat16)`),
    via ml_dtypes' cast."""
    import ml_dtypes  # noqa: PLC0415 (only rounding needs it, not reading BF16: a slow import)
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


_local = threading.local()


def _buffer(size):
    """A uint32 scratch buffer of `size` elements, reused across calls (one per thread, grown
    when a product needs more): allocating it per product costs page faults on every call."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < size:
        buf = _local.buf = np.empty(size, dtype=np.uint32)
    return buf[:size]


def _blocks(bits, rows_of_x):
    """(lo, hi, widened float32 block [hi-lo, I]) over the rows of W, in a reused buffer."""
    O, I = bits.shape
    limit = GEMM_BLOCK_ELEMENTS if rows_of_x >= GEMM_ROWS else BLOCK_ELEMENTS
    rows = max(1, min(O, limit // I))
    buf = _buffer(rows * I).reshape(rows, I)
    for lo in range(0, O, rows):
        hi = min(lo + rows, O)
        block = buf[:hi - lo]
        np.copyto(block, bits[lo:hi], casting="safe")
        block <<= 16                                             # bf16 bits -> fp32 bits
        yield lo, hi, block.view(np.float32)


class BF16Matrix:
    """A weight matrix [O, I] stored as bfloat16 bits (uint16), used as fp32."""

    __array_ufunc__ = None      # `ndarray @ BF16Matrix` defers to __rmatmul__ below

    def __init__(self, bits):
        if bits.dtype != np.uint16 or bits.ndim != 2:
            raise TypeError(f"BF16Matrix needs uint16[O, I] bits, got {bits.dtype}{list(bits.shape)}")
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    nbytes = property(lambda self: self.bits.nbytes)
    ndim = 2
    dtype = np.dtype(np.float32)      # the dtype it is used as

    @property
    def T(self):
        return Transposed(self)

    def to_f32(self):
        """The whole matrix widened: float32[O, I] (exact)."""
        return bf16_to_f32(self.bits)

    def __getitem__(self, ids):
        """Rows widened, as indexing an fp32 matrix gives them: `W[ids]` -> float32[..., I]."""
        return bf16_to_f32(self.bits[ids])

    def matmul_transposed(self, x):
        """x @ W.T: [..., I] -> [..., O]; each output block is one BLAS product."""
        O, I = self.shape
        x2 = x.reshape(-1, I)                                        # [R, I]
        out = np.empty((x2.shape[0], O), dtype=np.float32)           # [R, O]
        for lo, hi, block in _blocks(self.bits, x2.shape[0]):
            np.matmul(x2, block.T, out=out[:, lo:hi])
        return out.reshape(*x.shape[:-1], O)

    def __rmatmul__(self, x):
        """x @ W: [..., O] -> [..., I], summed block by block."""
        O, I = self.shape
        x2 = x.reshape(-1, O)
        out = np.zeros((x2.shape[0], I), dtype=np.float32)
        for lo, hi, block in _blocks(self.bits, x2.shape[0]):
            out += x2[:, lo:hi] @ block
        return out.reshape(*x.shape[:-1], I)

    def __repr__(self):
        return f"BF16Matrix({list(self.shape)}, {self.nbytes / 1e6:.1f} MB)"


class Transposed:
    """`W.T` of a weight that is not an array (a BF16Matrix, or a LoraWeight of
    npvlm/training/lora.py): only what the model math does with it, `x @ W.T`, which the weight
    computes itself (`W.matmul_transposed(x)`)."""

    __array_ufunc__ = None      # `ndarray @ Transposed` defers to __rmatmul__

    def __init__(self, matrix):
        self.matrix = matrix

    @property
    def shape(self):
        O, I = self.matrix.shape
        return (I, O)

    def __rmatmul__(self, x):
        return self.matrix.matmul_transposed(x)
