"""Prototype: would reduced-precision weight storage speed up decoding in NumPy?

Decode reads every weight once per token, and npvlm's decode step already runs at the memory
bandwidth of fp32 weights (docs/performance.md). Storing weights in 16 or 8 bits halves or
quarters the bytes, but NumPy/OpenBLAS has no bf16 or int8 matrix-vector product: the weights
must be widened to fp32 before BLAS sees them. This script measures whether that can pay off
when it is done as well as NumPy allows: row blocks small enough that the widened copy stays in
the L2 cache, widened and multiplied block by block, the blocks spread over all cores (one BLAS
thread each).

    python tools/bench_lowp.py [--rows 8192] [--cols 16384] [--repeats 5]

Prints a markdown table: seconds per pass over one [rows, cols] weight matrix, weight bytes per
second, and the speed relative to the fp32 product. The decoder's largest matrices are
[16384, 2048] (3B MLP) and [257216, 2048] (lm_head); the default 8192 x 16384 fp32 matrix is
512 MB, far larger than any cache, as every decode weight is.
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from bench import median_time      # tools/bench.py: median wall time after one warm-up call


def blocked(widen_into, rows, block_rows, threads, pool):
    """y = W x over row blocks: each thread widens a block into its own fp32 buffer (in cache),
    then multiplies it with BLAS limited to one thread."""
    spans = [(lo, min(lo + block_rows, rows)) for lo in range(0, rows, block_rows)]
    per_thread = [spans[i::threads] for i in range(threads)]

    def work(my_spans, buf, x, y):
        for lo, hi in my_spans:
            b = buf[:hi - lo]
            widen_into(lo, hi, b)
            np.matmul(b, x, out=y[lo:hi])

    def run(x, y, bufs):
        with threadpool_limits(1, user_api="blas"):
            futures = [pool.submit(work, s, bufs[i], x, y) for i, s in enumerate(per_thread)]
            for f in futures:
                f.result()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block-elements", type=int, default=1 << 16)
    args = p.parse_args()
    R, C = args.rows, args.cols
    threads = len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((R, C), dtype=np.float32)
    x = rng.standard_normal(C, dtype=np.float32)
    y = np.empty(R, np.float32)
    ref = w32 @ x
    # bf16: the top 16 bits of each fp32 (round to nearest even, as torch does)
    u = w32.view(np.uint32)
    w16 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    # int8 with one fp32 scale per row (symmetric)
    scale = np.abs(w32).max(axis=1) / 127.0
    w8 = np.round(w32 / scale[:, None]).astype(np.int8)
    del u
    block_rows = max(1, args.block_elements // C)
    bufs = [np.empty((block_rows, C), np.float32) for _ in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def widen_bf16(lo, hi, b):
        bu = b.view(np.uint32)
        np.copyto(bu, w16[lo:hi], casting="unsafe")
        bu <<= 16

    def widen_int8(lo, hi, b):
        np.copyto(b, w8[lo:hi], casting="unsafe")
        b *= scale[lo:hi, None]

    run_bf16 = blocked(widen_bf16, R, block_rows, threads, pool)
    run_int8 = blocked(widen_int8, R, block_rows, threads, pool)
    run_bf16(x, y, bufs)
    err16 = np.abs(y - ref).max() / np.abs(ref).max()
    run_int8(x, y, bufs)
    err8 = np.abs(y - ref).max() / np.abs(ref).max()

    rows = [("fp32, one BLAS call (npvlm today)", w32.nbytes, median_time(lambda: w32 @ x, args.repeats)),
            ("fp32, blocked over threads (control)", w32.nbytes,
             median_time(lambda: blocked(lambda lo, hi, b: np.copyto(b, w32[lo:hi]), R, block_rows, threads, pool)(x, y, bufs), args.repeats)),
            ("bf16 stored, widened per block", w16.nbytes, median_time(lambda: run_bf16(x, y, bufs), args.repeats)),
            ("int8 + row scale, widened per block", w8.nbytes + scale.nbytes,
             median_time(lambda: run_int8(x, y, bufs), args.repeats)),
            ("bf16 widened whole, then BLAS", w16.nbytes,
             median_time(lambda: (w16.astype(np.uint32) << 16).view(np.float32) @ x, args.repeats))]
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    kernel = f"{blas[0]['internal_api']} {blas[0]['version']} ({blas[0].get('architecture')})" if blas else "?"
    print(f"matrix [{R}, {C}], {threads} threads, numpy {np.__version__}, BLAS {kernel}, "
          f"block {block_rows} rows; relative error of the product: bf16 {err16:.1e}, int8 {err8:.1e}\n")
    print("| weights | bytes read | s per pass | weight GB/s | speed vs fp32 |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for name, nbytes, secs in rows:
        print(f"| {name} | {nbytes / 1e6:.0f} MB | {secs:.4f} | {nbytes / secs / 1e9:.1f} | {base / secs:.2f}x |")


if __name__ == "__main__":
    main()
