#!/usr/bin/env bash
# repguard's main job: guarded generation on the embedded default model (smollm2-135m) with its
# shipped neuron map, printed beside the unguarded output (a confirmed loop is rolled back to its
# onset and re-decoded with the repair active). Extra args go to `repguard generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/repguard generate --model smollm2-135m --compare --max-new-tokens 200 --threads 2 "$@"
