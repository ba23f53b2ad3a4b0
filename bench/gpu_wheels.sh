#!/usr/bin/env bash
# Fetch the wheels bench/gpu.sh installs on a lent GPU machine (no network there): the project's
# runtime dependencies that its image lacks, for CPython 3.12 on x86-64 Linux, into .whl/
# (git-ignored; name it in the device call's `carry`).  Run where pip reaches PyPI.
#
#   bash bench/gpu_wheels.sh && du -sh .whl        # ~5 MiB; the carry limit is 64 MiB
#
# The image already has torch, triton, numpy, safetensors, prometheus-client, httpx, anyio,
# typer, rich, hypothesis, pytest, pytest-timeout, uvloop (.library/device/KINDS.md); these
# versions are the ones the test suite runs with here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
    python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 \
    uvicorn==0.54.0 httptools==0.9.0 orjson==3.13.0 redis==8.1.0 hiredis==3.5.0 typing-extensions==4.16.0 opentelemetry-api==1.45.2
ls .whl
