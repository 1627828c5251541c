#!/usr/bin/env bash
# On a GPU machine: the whole test suite with the CuPy cases enabled, then the GPU benchmark.
#
#   bash tools/gpu_check.sh [OUT_DIR]       # OUT_DIR defaults to $OUT (device tool) or ./gpu_out
#
# The device machines have cupy-cuda13x, torch and transformers but no network. npvlm's other
# dependencies (sentencepiece, pillow, tqdm, pytest, hypothesis, safetensors) are installed from a
# wheelhouse carried in .gpu_wheels/ when they are missing; make it here first with
#   pip download -d .gpu_wheels --only-binary=:all: --python-version 3.X \
#       sentencepiece pillow tqdm pytest hypothesis safetensors
# (3.X = the device's Python) and pass carry=[".gpu_wheels"] to the device tool.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
export CUPY_TF32=0              # fp32 GEMMs stay fp32: parity tolerances assume it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, numpy, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion())"
} 2>&1 | tee "$out/gpu_env.txt"

for mod in sentencepiece PIL tqdm pytest hypothesis safetensors; do
  python -c "import $mod" 2>/dev/null || {
    [ -d .gpu_wheels ] && pip install -q --no-index --find-links .gpu_wheels sentencepiece pillow tqdm pytest hypothesis safetensors
    break
  }
done

python -c "from npvlm.backend import get_backend; get_backend('cupy'); print('cupy backend usable')" 2>&1 | tee -a "$out/gpu_env.txt"

# 1. every test, NumPy and CuPy cases (the gpu-marked ones run because a GPU is usable)
timeout 300 python -m pytest -q -rs 2>&1 | tail -40 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

# 2. npvlm-CuPy vs transformers on the same card, 3B-224 shapes, random weights, synchronized timers
timeout 420 python tools/bench.py --sizes 3b --backend cupy --hf-device cuda --repeats 3 --no-write \
  2>&1 | tail -30 | tee "$out/gpu_bench.md"

exit "$tests_rc"
