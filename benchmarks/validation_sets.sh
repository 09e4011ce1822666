#!/usr/bin/env bash
# Validation-speaker sets for choosing post-processing settings and checkpoints (never test speakers):
# the six presets (12 files each), one-speaker recordings (8 clean, 8 noisy), recorded voices (12 conversations,
# 8 one-speaker recordings), four 10-minute meetings and recordings with no speech
# at all (8 each of noise, music, tones: the sweep's noise group on the validation split).
#   bash benchmarks/validation_sets.sh [BANK] [OUT]      (default: data/bank, data/validation_sets)
set -euo pipefail
cd "$(dirname "$0")/.."
BANK=${1:-data/bank}
OUT=${2:-data/validation_sets}
simulate() { .venv/bin/nanodrz simulate --bank "$BANK" --split validation "$@" > /dev/null; }
# The presets, one-speaker and no-speech sets draw TTS voices only: they were made before the bank had
# recorded validation voices, and `--voices tts` gives the same files.
for preset in clean overlap noisy crowd phone ambient; do
  [ -d "$OUT/$preset" ] || simulate --preset "$preset" --num 12 --seed 11 --voices tts --out "$OUT/$preset"
done
for preset in clean noisy; do
  [ -d "$OUT/mono-$preset" ] || simulate --preset "$preset" --num 8 --seed 12 --voices tts --set num_speakers=1 --set duration=30 \
    --out "$OUT/mono-$preset"
done
# recorded voices (KLettres readers): choices made on TTS voices alone did not carry over to recorded ones
[ -d "$OUT/recorded-clean" ] || simulate --preset clean --num 12 --seed 14 --voices recorded --out "$OUT/recorded-clean"
[ -d "$OUT/mono-recorded" ] || simulate --preset clean --num 8 --seed 15 --voices recorded --set num_speakers=1 \
  --set duration=30 --out "$OUT/mono-recorded"
# long form: 10-minute meetings (TTS voices: a KLettres reader has under 2 min of letters), where labels
# must stay the same from chunk to chunk
[ -d "$OUT/meeting10" ] || simulate --preset benchmarks/presets/meeting10.yaml --num 4 --seed 16 --voices tts \
  --out "$OUT/meeting10"
NO_SPEECH=(--set nonspeech.no_speech_probability=1 --set nonspeech.sounds=1 --set nonspeech.gap_probability=0
           --set nonspeech.level_db=[-10,0] --set duration=20)
[ -d "$OUT/noise" ] || simulate --preset clean --num 8 --seed 13 --voices tts "${NO_SPEECH[@]}" --set "nonspeech.types={noise: 1}" --out "$OUT/noise"
[ -d "$OUT/music" ] || simulate --preset clean --num 8 --seed 13 --voices tts "${NO_SPEECH[@]}" --set "nonspeech.types={music: 1}" --out "$OUT/music"
[ -d "$OUT/tones" ] || simulate --preset clean --num 8 --seed 13 --voices tts "${NO_SPEECH[@]}" --set "nonspeech.types={tone: 1, square: 1}" --out "$OUT/tones"
echo "validation sets in $OUT"
