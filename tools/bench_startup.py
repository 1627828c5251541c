"""How long the first command takes: `python run.py` and `npvlm` on the demo model, whole processes.

    python tools/bench_startup.py                  # 5 runs of each, the import-time breakdown
    python tools/bench_startup.py --runs 9

Prints, for the machine it runs on (CPU, Python, numpy, BLAS kernel, ml_dtypes version):
1. wall time of whole processes, median / min / max of --runs (after one warm-up run that fills
   the page cache): `python run.py` and `npvlm` (the demo: load, encode, prefill, decode a
   caption), `python -c "import npvlm"`, and `python -c "import <the model math>"`;
2. where `python run.py` spends its imports, from `python -X importtime` (median of --runs):
   the self time of every imported module summed by top-level package, and the cumulative time
   of each npvlm module that was imported;
3. what is imported at all: the optional packages (ml_dtypes, tqdm, huggingface_hub) must not be,
   on the demo run.
Measure on a quiet machine: another BLAS-heavy process on 2 cores slows these runs several times.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATH = "npvlm.model.layers, npvlm.model.attention, npvlm.model.siglip, npvlm.model.gemma, npvlm.model.paligemma, npvlm.model.loss"
OPTIONAL = ("ml_dtypes", "tqdm", "huggingface_hub", "torch", "transformers")


def wall(cmd, runs):
    """Median, min, max wall seconds of `runs` whole-process runs of cmd (after one warm-up)."""
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def importtime(cmd):
    """{module: (self us, cumulative us)} from one `python -X importtime` run of cmd."""
    r = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    out = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            out[m.group(4)] = (int(m.group(1)), int(m.group(2)))
    return out


def machine():
    info = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import importlib.metadata as md
    for pkg in ("numpy", "ml_dtypes", "pillow", "sentencepiece", "safetensors"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        import numpy  # noqa: F401 (loads the BLAS that threadpoolctl reports)
        from threadpoolctl import threadpool_info
        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        info["blas"] = ", ".join(f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}, "
                                 f"{p['num_threads']} threads)" for p in blas)
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    return info


def machine_line():
    """The line every benchmark prints first: CPU, usable cores, Python, numpy, BLAS kernel."""
    info = machine()
    return (f"machine: {info['cpu']}, {len(os.sched_getaffinity(0))} cores, Python {info['python']}, "
            f"numpy {info['numpy']}, BLAS {info['blas']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--math", default=MATH, help="the model-math modules to import alone")
    args = ap.parse_args()
    py = sys.executable
    commands = {"python run.py (demo)": [py, "run.py"]}
    script = shutil.which("npvlm", path=str(Path(py).parent))
    if script:
        commands["npvlm (demo)"] = [script]
    commands["import npvlm"] = [py, "-c", "import npvlm"]
    commands["import the model math"] = [py, "-c", f"import {args.math}"]
    commands["python -c pass (the interpreter)"] = [py, "-c", "pass"]

    info = machine()
    print(f"machine: {info['cpu']}, Python {info['python']}, numpy {info['numpy']}, BLAS {info['blas']}")
    print(f"packages: ml_dtypes {info['ml_dtypes']}, pillow {info['pillow']}, sentencepiece "
          f"{info['sentencepiece']}, safetensors {info['safetensors']}\n")
    print(f"| command | median s | min s | max s |  ({args.runs} runs each)")
    print("|---|---:|---:|---:|")
    for label, cmd in commands.items():
        med, lo, hi = wall(cmd, args.runs)
        print(f"| `{label}` | {med:.3f} | {lo:.3f} | {hi:.3f} |")

    runs = [importtime([py, "run.py"]) for _ in range(args.runs)]
    modules = set().union(*runs)

    def median_of(name, which):
        return statistics.median(r[name][which] if name in r else 0 for r in runs) / 1e3

    by_package = {}
    for name in modules:
        top = name.split(".")[0]
        by_package[top] = by_package.get(top, 0.0) + median_of(name, 0)
    total = sum(by_package.values())
    print(f"\nimports of `python run.py`: {total:.0f} ms in all (median of {args.runs}; self time summed "
          "by top-level package, the largest first)\n")
    print("| package | ms | share |")
    print("|---|---:|---:|")
    for top, ms in sorted(by_package.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {top} | {ms:.1f} | {ms / total:.0%} |")

    ours = sorted((n for n in modules if n.startswith("npvlm")), key=lambda n: -median_of(n, 1))
    print(f"\nnpvlm modules imported by the demo run ({len(ours)}), cumulative ms (with what each imports):\n")
    print(" ".join(f"{n} {median_of(n, 1):.1f};" for n in ours))
    present = [p for p in OPTIONAL if p in {n.split(".")[0] for n in modules}]
    print(f"\noptional packages imported by the demo run: {', '.join(present) if present else 'none'}")


if __name__ == "__main__":
    main()
