#!/usr/bin/env bash
# The wheelhouse tools/gpu_check.sh installs from on a GPU machine without network:
#
#   bash tools/make_gpu_wheels.sh [PYTHON_VERSION ...]     # default: 3.10 3.11 3.12
#
# .gpu_wheels/<version>/ holds the compiled wheels for each Python, .gpu_wheels/any/ the pure
# ones. NumPy, CuPy, torch and transformers are not included (the device has them). The device
# tool carries at most 64 MiB with the working tree, so the script prints the total. The list is
# the one tools/gpu_check.sh checks for (exceptiongroup and tomli: pytest's needs on Python 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12)
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
rm -rf .gpu_wheels
mkdir -p .gpu_wheels/any
pip download -q --no-deps --only-binary=:all: -d .gpu_wheels/any \
  tqdm pytest pluggy iniconfig packaging pygments sortedcontainers exceptiongroup "safetensors>=0.4"
for v in "${versions[@]}"; do
  pip download -q --no-deps --only-binary=:all: --python-version "$v" "${platforms[@]}" \
    -d ".gpu_wheels/$v" sentencepiece pillow ml_dtypes hypothesis tomli
done
du -sh .gpu_wheels
