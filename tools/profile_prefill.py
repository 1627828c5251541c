"""Where a prefill's time goes beyond its matrix products: every `linear` call timed inside the
prefill against the same products replayed alone, page faults, input layouts, with npvlm's
allocator thresholds and with glibc's own (npvlm/cpu.py).

    python tools/profile_prefill.py                     # mid and 3B-224 shapes, both allocators
    python tools/profile_prefill.py --sizes mid --repeats 5

Each (size, allocator) runs in a fresh process with random weights built in memory (the speed
does not depend on their values; 3B needs ~12 GB of RAM) and BLAS at its default thread count.
Per row, medians of --repeats after a warm-up:
- prefill: `PaliGemma.prefill` (image encode + text prefill, the last position's logits);
- inside linear: the sum of every `layers.linear` call in it (a timing wrapper);
- the same products alone: each of those calls' products replayed back to back with contiguous
  random inputs of the same shapes, fresh outputs (as `linear` makes them), and into
  preallocated outputs (no allocation at all);
- page faults (minor) per prefill and inside linear; inputs to `linear` that are not
  contiguous (a copy before the product);
- peak RSS.
"inside linear" well above "alone" means the products are slower in the prefill's company
(caches, thread hand-offs, allocation); prefill minus inside linear is the elementwise work.
Name the CPU and BLAS kernel with the numbers (printed first); measure on a quiet machine.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import json, resource, statistics, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from bench import bench_inputs, config_dict
from npvlm import cpu
from npvlm.api import PaliGemma
from npvlm.config import config_from_dict
from npvlm.loading.weights import expected_shapes, tree_name
from npvlm.model import gemma, layers, paligemma, siglip
from npvlm.tree import unflatten

size, allocator, repeats = sys.argv[1], sys.argv[2], int(sys.argv[4])
if allocator == "glibc":
    cpu._state["malloc"] = False                 # as where npvlm leaves the allocator alone
cpu.set_threads(cpu.default_threads())
cfg = config_from_dict(config_dict(size))
rng = np.random.default_rng(0)
params = {}
for name, shape in expected_shapes(cfg).items():
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(0.02)
    params[tree_name(name)] = a.reshape(a.shape[0], -1) if name.endswith("patch_embedding.weight") else a
model = PaliGemma(cfg, unflatten(params), np)
ids, mask, pixels = bench_inputs(size)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

calls, plain = [], layers.linear
def timed(x, weight, bias=None, *, save=None):
    f0, t0 = faults(), time.perf_counter()
    y = plain(x, weight, bias, save=save)
    calls.append((time.perf_counter() - t0, faults() - f0, x.shape, x.flags.c_contiguous, weight))
    return y
for module in (gemma, siglip, paligemma):
    module.linear = timed

model.prefill(ids, mask, pixels)
rows = []
for _ in range(repeats):
    calls.clear()
    f0, t0 = faults(), time.perf_counter()
    model.prefill(ids, mask, pixels)
    rows.append((time.perf_counter() - t0, sum(c[0] for c in calls), faults() - f0, sum(c[1] for c in calls)))
for module in (gemma, siglip, paligemma):
    module.linear = plain

inputs = [np.random.default_rng(1).standard_normal((int(np.prod(c[2][:-1])), c[2][-1]), dtype=np.float32)
          for c in calls]
outs = [np.empty((x.shape[0], c[4].shape[0]), np.float32) for x, c in zip(inputs, calls)]
def alone():
    for x, c in zip(inputs, calls):
        x @ c[4].T
def alone_out():
    for x, c, o in zip(inputs, calls, outs):
        np.matmul(x, c[4].T, out=o)
def timing(f):
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
med = lambda i: statistics.median(r[i] for r in rows)
print(json.dumps({"prefill_s": med(0), "linear_s": med(1), "faults": med(2), "linear_faults": med(3),
                  "calls": len(calls), "not_contiguous": sum(not c[3] for c in calls),
                  "alone_s": timing(alone), "alone_out_s": timing(alone_out),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["mid", "3b"], choices=["mid", "3b"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_startup import machine_line
    print(machine_line() + "\n")
    print("| size | allocator | prefill s | inside linear s (calls) | the same products alone s | "
          "alone, preallocated outputs s | page faults (in linear) | inputs not contiguous | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for allocator in ("npvlm", "glibc"):
            r = subprocess.run([sys.executable, "-c", WORKER, size, allocator, str(ROOT / "tools"), str(args.repeats)],
                               capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(r.stderr)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            name = "npvlm's (cpu.py)" if allocator == "npvlm" else "glibc's own"
            print(f"| {size} | {name} | {m['prefill_s']:.3f} | {m['linear_s']:.3f} ({m['calls']}) | {m['alone_s']:.3f} "
                  f"| {m['alone_out_s']:.3f} | {m['faults']:.0f} ({m['linear_faults']:.0f}) | {m['not_contiguous']} "
                  f"| {m['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
