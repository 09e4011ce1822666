#!/usr/bin/env bash
# Set everything up (idempotent), then diarize the shipped example conversation and the real annotated
# pyannote sample with the shipped model, print the turns, and score them against their references.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out/example
cp examples/conversation.rttm data/pyannote-sample/sample.rttm out/example/ 2>/dev/null || true
.venv/bin/nanodrz diarize examples/conversation.wav data/pyannote-sample/sample.wav \
  --out out/example/hyp --format rttm,json --plot
echo
echo "== nanodrz diarize examples/conversation.wav (3 synthetic speakers from held-out test voices)"
cat out/example/hyp/conversation.rttm
echo
echo "== nanodrz diarize data/pyannote-sample/sample.wav (a real 30 s telephone conversation)"
cat out/example/hyp/sample.rttm
echo
.venv/bin/nanodrz evaluate --ref out/example --hyp out/example/hyp
echo "Timeline plots: out/example/hyp/*.png"
