#!/usr/bin/env bash
# Installs embserve into the active Python environment.  The same script runs in CI, in the
# Docker images and for a developer; README's set-up commands call it.
#
#   bash docker/install.sh            runtime only
#   bash docker/install.sh test       + test dependencies
#   bash docker/install.sh test,bench + benchmark extras (FBGEMM CPU)
#   bash docker/install.sh load       + locust for loadtest/
#
# Environment: TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL (a wheel index, e.g. the CPU
# or CUDA index of download.pytorch.org), EMBSERVE_EDITABLE=0 (plain install, for images),
# EMBSERVE_TORCH_ONLY=1 (torch alone).
#
# torch is pinned first, on its own: an unpinned torch pulls a multi-GB CUDA build.  Set
# TORCH_INDEX_URL to a CPU wheel index where PyPI would hand out a CUDA build (Docker CPU image).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
    python -m pip install --quiet "$TORCH_SPEC"
fi
# EMBSERVE_TORCH_ONLY=1: stop here (the images install torch in a layer of its own, before the
# source is copied, so that a change to the code does not reinstall it)
[ "${EMBSERVE_TORCH_ONLY:-0}" = "1" ] && exit 0
# editable for development and CI (EMBSERVE_EDITABLE=1, the default); images set 0 for a plain install
EDITABLE_FLAG="-e"
[ "${EMBSERVE_EDITABLE:-1}" = "0" ] && EDITABLE_FLAG=""
TARGET="."
[ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
python -m pip install --quiet $EDITABLE_FLAG "$TARGET"
# from outside the source tree: there, `import compression` would find the uninstalled sources
# (no compiled decoder) instead of what a plain install put in site-packages
cd /
python - <<'PY'
from compression.kernels import COMPILED_AVAILABLE, cpu_c
import torch
entry = "yes" if cpu_c.ENTRY_AVAILABLE else "NO (ctypes calls; install Python's headers, e.g. python3-dev, and reinstall)"
print(f"embserve installed: torch {torch.__version__}, compiled CPU decoder: {'yes' if COMPILED_AVAILABLE else 'NO (torch path)'}, "
      f"its CPython entry: {entry}")
PY
