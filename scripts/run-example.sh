#!/usr/bin/env bash
# Set everything up (idempotent), build the speech bank, and write an example synthetic conversation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/nanodrz prepare
.venv/bin/nanodrz simulate --preset overlap --num 1 --seed 0 --out out/example
echo
echo "Example conversation: out/example (audio, RTTM reference, manifest.json)"
cat out/example/*.rttm
