#!/usr/bin/env bash
# The one GPU run: CuPy tests, inference benchmark and training-step benchmark, all output in OUT.
#
#   bash tools/gpu_check.sh [STAGE] [OUT_DIR]     # STAGE: all (default) | tests | bench | full
#   NPVLM_GPU_REHEARSAL=1 bash tools/gpu_check.sh all /tmp/rehearsal     # on a CPU machine
#
# OUT_DIR defaults to $OUT (the device tool's folder) or ./gpu_out. Each step has its own time
# limit and writes its file as soon as it ends, so a run cut short still returns what it did:
#   gpu_env.txt          the card, driver, Python, NumPy/CuPy/torch versions
#   gpu_smoke.txt        the demo model on CuPy vs NumPy: same text (a fast first failure)
#   gpu_tests.txt        every test with the gpu mark: each parity, gradient, sampling and API
#                        test's CuPy case, the decode-loop synchronization guard
#   gpu_bench.md         tools/bench.py: npvlm-CuPy vs transformers (eager fp32, same card, same
#                        run, synchronized timers), 3B-224 shapes, random weights
#   gpu_bench_train.md   tools/bench_train.py: one forward + backward, 3B-224, attention only
#   gpu_full_tests.txt   (STAGE full) the whole suite, NumPy and CuPy cases
# Budget: the step limits of `all` add up to 60 + 180 + 210 + 120 = 570 s, under the device
# tool's 600 s a command (run it with timeout_s 590; 15 minutes a task, start-up included).
#
# The device machines have cupy-cuda13x, torch and transformers but no network. npvlm's other
# dependencies are installed, when missing, from a wheelhouse carried in .gpu_wheels/ (make it
# with tools/make_gpu_wheels.sh; carry=[".gpu_wheels"]).
#
# Rehearsal (NPVLM_GPU_REHEARSAL=1): every step on the CPU, with the NumPy backend, the "mid"
# benchmark model and tests/test_fake_cupy.py (a strict CuPy stand-in) in place of the CuPy
# tests; it proves the script, the wheelhouse and the benchmark plumbing, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
out="${2:-${OUT:-gpu_out}}"
mkdir -p "$out"
export CUPY_TF32=0              # fp32 GEMMs stay fp32: parity tolerances assume it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
rehearsal="${NPVLM_GPU_REHEARSAL:-0}"
if [ "$rehearsal" = 1 ]; then
  backend=numpy; hf_device=cpu; sizes=mid; train_case=mid-all; repeats=2
else
  backend=cupy; hf_device=cuda; sizes=3b; train_case=3b-attention; repeats=3
fi
rc=0
step() {   # step NAME SECONDS FILE COMMAND...: run with a limit, keep the output, note the status
  local name=$1 limit=$2 file=$3; shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$out/gpu_steps.txt"
  timeout "$limit" "$@" > "$out/$file" 2>&1
  local s=$?
  tail -25 "$out/$file"
  echo "== $name: exit $s after $((SECONDS - t0)) s" | tee -a "$out/gpu_steps.txt"
  [ "$s" = 0 ] || rc=1
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  python - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("numpy", "cupy", "torch", "transformers", "sentencepiece", "PIL", "safetensors", "ml_dtypes", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
EOF
} > "$out/gpu_env.txt" 2>&1

missing=$(python - <<'EOF'
import importlib, sys
need = {"sentencepiece": "sentencepiece", "PIL": "pillow", "tqdm": "tqdm", "pytest": "pytest",
        "hypothesis": "hypothesis", "safetensors": "safetensors", "ml_dtypes": "ml_dtypes",
        "iniconfig": "iniconfig", "pluggy": "pluggy", "sortedcontainers": "sortedcontainers",
        "packaging": "packaging", "pygments": "pygments"}       # the wheelhouse's list (make_gpu_wheels.sh)
if sys.version_info < (3, 11):                                  # pytest's backports
    need.update(exceptiongroup="exceptiongroup", tomli="tomli")
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -d .gpu_wheels ]; then
    py=$(python -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    pip install -q --no-index --no-deps --find-links ".gpu_wheels/$py" --find-links .gpu_wheels/any $missing \
      >> "$out/gpu_env.txt" 2>&1 || echo "wheel install failed for: $missing" >> "$out/gpu_env.txt"
  else
    echo "missing and no .gpu_wheels/: $missing" >> "$out/gpu_env.txt"
  fi
fi
python -c "from npvlm.backend import get_backend; get_backend('$backend'); print('backend $backend usable')" \
  >> "$out/gpu_env.txt" 2>&1
cat "$out/gpu_env.txt"

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  step smoke 60 gpu_smoke.txt python - "$backend" <<'EOF'
import sys, time
import numpy as np
import npvlm
from npvlm.demo.scenes import make_scene
images = [make_scene(np.random.default_rng([7, i])).image for i in range(4)]
prompts = ["caption en", "detect circle", "answer en how many shapes are there?", "answer en what color is the square?"]
cpu = npvlm.load("demo")
want = [str(g) for g in cpu.generate(images, prompts, max_new_tokens=24)]
t0 = time.perf_counter()
dev = npvlm.load("demo", backend=sys.argv[1])
got = [str(g) for g in dev.generate(images, prompts, max_new_tokens=24)]
print(f"backend {sys.argv[1]}: load + generate {time.perf_counter() - t0:.1f} s")
for p, w, g in zip(prompts, want, got):
    print(f"{'same' if w == g else 'DIFFERENT'}  {p!r}: numpy {w!r}, {sys.argv[1]} {g!r}")
sys.exit(0 if want == got else 1)
EOF
  if [ "$rehearsal" = 1 ]; then
    step tests 400 gpu_tests.txt python -m pytest -q -rs -p no:cacheprovider tests/test_fake_cupy.py
  else
    step tests 180 gpu_tests.txt python -m pytest -q -rs -p no:cacheprovider -m gpu --durations=15
  fi
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  step bench 210 gpu_bench.md python tools/bench.py --sizes "$sizes" --backend "$backend" \
    --hf-device "$hf_device" --repeats "$repeats" --no-write
  step bench_train 120 gpu_bench_train.md python tools/bench_train.py --cases "$train_case" \
    --backend "$backend" --hf-device "$hf_device" --repeats "$repeats" --no-bf16
fi

if [ "$stage" = full ]; then
  step full_tests 580 gpu_full_tests.txt python -m pytest -q -rs -p no:cacheprovider --deselect \
    tests/test_lint.py::test_ruff_passes
fi

exit "$rc"
