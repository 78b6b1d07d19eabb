#!/usr/bin/env bash
# The GPU check of a session lent an accelerator (benchmarks/gpu_check.py): one prepared run.
#   here:  bash scripts/gpu_check.sh wheels   # the few packages the GPU image lacks, as cp312 wheels in .whl/
#   there: bash scripts/gpu_check.sh run      # (the device tool's command; carry .whl) results under $OUT/gpu-check
# The GPU image has torch, transformers, accelerate, safetensors and prometheus-client, but not pydantic.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    py=${PYTHON:-.venv/bin/python}
    for pkg in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
               typing-extensions==4.16.0; do
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pkg"
    done
    ls .whl
    ;;
  run)
    : "${OUT:?run this through the device tool, which sets OUT}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv || true
    python3 benchmarks/gpu_check.py --device cuda --out "$OUT/gpu-check" "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh wheels|run [gpu_check.py options]" >&2
    exit 2
    ;;
esac
