#!/usr/bin/env bash
# The device check, in one call on a lent GPU machine (its python3 holds a CUDA torch but no
# SimpleITK, and nothing can be fetched there). Prepare .device/ here first (benchmarks/README.md,
# "On a lent GPU machine"), then run `bash benchmarks/gpu_check.sh` there with .device carried.
# Prints and leaves under $OUT: the CUDA tests' output, the whole-command table, every report.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import SimpleITK" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/wheels/*.whl \
    || { echo "gpu_check: could not install the carried wheels in .device/wheels"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'CUDA available:', torch.cuda.is_available())"
# the tests that skip without CUDA (the suite hides the GPU unless asked)
INVERSEREG_TEST_CUDA=1 python3 -m pytest -q -p no:cacheprovider Testing/Python/test_mutual.py \
  -k gpu 2>&1 | tee "$OUT/pytest.txt"
python3 benchmarks/gpu_check.py --data .device/data --out "$OUT" --cpu-baseline "$@" 2>&1 | tee "$OUT/gpu_check.txt"
