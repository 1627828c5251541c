"""npvlm on a busy machine: each workload alone and beside a competing BLAS-heavy process, under
each BLAS thread policy.

    python tools/bench_load.py                      # every workload, policy and load; prints a table
    python tools/bench_load.py --workloads demo --repeats 3

Workloads, each run in a fresh process (so the thread settings apply from the start), timing
only the work (not the interpreter or the load):
- `demo`: 16 greedy answers of the embedded demo model on the sample scene (one prompt each);
- `mid`: three prefills (268 tokens, 224 px) of a random-weight PaliGemma of ~0.5 B parameters
  (tools/bench.py's "mid" shapes, built in memory);
- `train`: 5 training steps of the demo model (every parameter trained, batch 8).

Loads: `alone`; `BLAS job`: a second process multiplying 1024 x 1024 fp32 matrices in a loop
with numpy's default BLAS threads (what another numpy or torch job does), started a second
before the workload; `1-thread BLAS job`: the same at one thread (what a second npvlm that chose
one thread does to the first). Policies: `npvlm` (its choice from the load, what a user gets),
`all cores` (BLAS's default: what npvlm did before it chose; NPVLM_THREADS=<cores>), `1`
(NPVLM_THREADS=1). Medians of --repeats; the slowdown is against the same workload alone with
its own policy. Measure on an otherwise quiet machine; name the CPU and BLAS kernel with the
numbers (printed first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r'''
import json, sys, time
import numpy as np
kind = sys.argv[1]
import npvlm
if kind == "demo":
    from npvlm.demo import SAMPLE_SCENE
    model = npvlm.load("demo")
    model.generate(SAMPLE_SCENE, "caption en")                      # warm-up
    t0 = time.perf_counter()
    for _ in range(16):
        model.generate(SAMPLE_SCENE, "detect circle ; square ; triangle")
elif kind == "train":
    from npvlm.demo.scenes import make_scene, tasks
    from npvlm.training.grads import loss_and_grads
    model = npvlm.load("demo")
    scenes = [make_scene(np.random.default_rng([5, i])) for i in range(8)]
    pairs = [tasks(s)[0] for s in scenes]
    batch = model.device_batch(model.processor([s.image for s in scenes], [p for p, _ in pairs], [a for _, a in pairs]))
    loss_and_grads(batch, model.params, model.cfg, "all")           # warm-up
    t0 = time.perf_counter()
    for _ in range(5):
        loss_and_grads(batch, model.params, model.cfg, "all")
else:
    sys.path.insert(0, sys.argv[2])
    from bench import SIZES, bench_inputs, config_dict
    from npvlm.api import PaliGemma
    from npvlm.config import config_from_dict
    from npvlm.loading.weights import expected_shapes, tree_name
    from npvlm.tree import unflatten
    cfg = config_from_dict(config_dict("mid"))
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in expected_shapes(cfg).items():
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        params[tree_name(name)] = a.reshape(a.shape[0], -1) if name.endswith("patch_embedding.weight") else a
    model = PaliGemma(cfg, unflatten(params), np)
    from npvlm import cpu
    cpu.on_load()                                                # what npvlm.load does
    ids, mask, pixels = bench_inputs("mid")
    model.prefill(ids, mask, pixels)                                 # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        model.prefill(ids, mask, pixels)
from npvlm.cpu import blas_threads
print(json.dumps({"seconds": time.perf_counter() - t0, "threads": blas_threads()}))
'''

LOAD = r'''
import numpy as np
a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
while True:
    a = (a @ a) * np.float32(1e-3)
'''

POLICIES = {"npvlm": {}, "all cores": {"NPVLM_THREADS": str(len(os.sched_getaffinity(0)))},
            "1": {"NPVLM_THREADS": "1"}}
LOADS = {"alone": None, "BLAS job": {}, "1-thread BLAS job": {"OPENBLAS_NUM_THREADS": "1"}}


def run(kind, policy, busy):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_", "MKL_", "NPVLM_THREADS"))}
    env.update(POLICIES[policy])
    load = None
    if LOADS[busy] is not None:
        load = subprocess.Popen([sys.executable, "-c", LOAD], env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_"))}, **LOADS[busy]})
        time.sleep(1.0)
    try:
        r = subprocess.run([sys.executable, "-c", WORKLOAD, kind, str(ROOT / "tools")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["demo", "train", "mid"], choices=["demo", "train", "mid"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_startup import machine_line
    print(machine_line() + "\n")
    loads = [x for x in args.loads if x != "alone"]
    print("| workload | threads | alone: s (BLAS threads) | " + " | ".join(
        f"beside a {x}: s (BLAS threads), slowdown" for x in loads) + " |")
    print("|---|---|---:|" + "---:|" * len(loads))
    for kind in args.workloads:
        for policy in args.policies:
            cells = []
            for load in ["alone", *loads]:
                runs = [run(kind, policy, load) for _ in range(args.repeats)]
                cells.append((statistics.median(r["seconds"] for r in runs),
                              "/".join(sorted({str(r["threads"]) for r in runs}))))
            (a, ta), rest = cells[0], cells[1:]
            print(f"| {kind} | {policy} | {a:.3f} ({ta}) | " + " | ".join(
                f"{b:.3f} ({tb}), {b / a:.1f}x" for b, tb in rest) + " |", flush=True)


if __name__ == "__main__":
    main()
