#!/usr/bin/env bash
# The prepared GPU run (issue 10): from a bare checkout on a lent GPU machine (no network),
# in under 8 minutes: install the carried wheels, build the C decoder, run the CUDA tests,
# compile-check the kernels, then bench/gpu.py, which writes bench/results/gpu.md.
#
# Here, once (where pip reaches PyPI):   bash bench/gpu_wheels.sh      # -> .whl/ (git-ignored, ~5 MiB)
# Device call:   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# Everything it writes lands in $OUT too (when set), so it comes back: gpu.md, tests.log, bench.log.
#
# Budget (H200, 16 CPUs): wheels ~10 s, tests ~2-3 min (each kernel variant compiles once,
# ~3-5 s), bench ~3-4 min.  Each step has its own timeout so a slow step cannot eat the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
step() { echo "=== $(($(date +%s) - started)) s: $*"; }

step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "no .whl/ carried: using the image's packages only"
    export PYTHONPATH="$PWD"
fi
python3 - <<'PY'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null

step "C decoder (optional)"
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 && echo built || echo "no C compiler: torch CPU path"

step "CUDA tests"
# test_triton runs its kernels on CUDA when a GPU is present; test_cuda serves tables from the
# GPU (auto -> Triton); test_batching merges concurrent lookups through a real server.
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 6"  # kernel variants compile in parallel
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" $XDIST tests/test_triton.py tests/test_cuda.py tests/test_batching.py \
    2>&1 | tee "$OUT/tests.log" | tail -25

step "bench"
timeout 330 python3 bench/gpu.py --out "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log" | tail -80
[ "$OUT" != "$PWD/bench/results" ] && [ -f "$OUT/gpu.md" ] && cp "$OUT/gpu.md" bench/results/gpu.md
step "done"
