#!/usr/bin/env bash
# Installs embserve into the active Python environment.  The same script runs in CI, in the
# Docker images and for a developer; README's set-up commands call it.
#
#   bash docker/install.sh            runtime only
#   bash docker/install.sh test       + test dependencies
#   bash docker/install.sh test,bench + benchmark extras (FBGEMM CPU)
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
if [ -n "$EXTRAS" ]; then
    python -m pip install --quiet ${EMBSERVE_EDITABLE:--e} ".[$EXTRAS]"
else
    python -m pip install --quiet ${EMBSERVE_EDITABLE:--e} .
fi
python - <<'PY'
from compression.kernels import COMPILED_AVAILABLE
import torch
print(f"embserve installed: torch {torch.__version__}, compiled CPU decoder: {'yes' if COMPILED_AVAILABLE else 'NO (torch path)'}")
PY
