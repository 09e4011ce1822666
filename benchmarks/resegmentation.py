"""Resegmentation by the overlap head (`nanodrz.resegment`) over a grid of thresholds, on a sweep's sets.

Each recording is decoded once (`Diarizer.chunk_outputs_many`); every grid point then replays the whole
post-processing of `nanodrz diarize` with its thresholds (the overlap threshold also decides the heard-overlap
evidence of the dominant-label split) and is scored (DER, collar 0, overlap scored) per set. The thresholds shipped in
`nanodrz.resegment` were chosen with this on validation speakers:

    nanodrz sweep --out benchmarks/results/validation_refined --preset \
        clean,overlap,noisy,crowd,phone,benchmarks/presets/meeting10.yaml --split validation --per-point 12
    .venv/bin/python benchmarks/resegmentation.py benchmarks/results/validation_refined/sets/sets \
        --model runs/small_overlap_head3/last.safetensors --markdown benchmarks/results/resegmentation.md
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import replay
from nanodrz.diarize import DiarizationSettings
from nanodrz.evaluate import score

SPEECH = (None, 0.4, 0.5, 0.6, 0.7)
OVERLAP = (None, 0.6, 0.7, 0.75, 0.8, 0.9)


def grid(found: dict, speech: tuple, overlap: tuple) -> list[dict]:
    rows = []
    for speech_threshold, overlap_threshold in tqdm(list(itertools.product(speech, overlap)), desc="grid"):
        row = {"speech": speech_threshold, "overlap": overlap_threshold, "der": {}}
        settings = DiarizationSettings(speech_threshold=speech_threshold, overlap_threshold=overlap_threshold)
        for set_name, files in sorted(found.items()):
            references = {name: reference for name, (reference, _) in files.items()}
            hypotheses = {name: outputs.finish(settings) for name, (_, outputs) in files.items()}
            total = score(references, hypotheses, collars=(0.0,)).total.at(0.0)
            row["der"][set_name] = (100 * total.der, 100 * total.missed / total.scored,
                                    100 * total.false_alarm / total.scored, 100 * total.confusion / total.scored)
        row["mean"] = float(np.mean([der for der, *_ in row["der"].values()]))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], model: str, sets: list[Path]) -> str:
    names = sorted(rows[0]["der"])
    lines = [f"# Resegmentation thresholds: `benchmarks/resegmentation.py`", "",
             f"Model `{model}`; sets under `{sets[0].parent}`. DER % (collar 0, overlap scored), and for each set",
             "missed / false alarm / confusion, in % of reference speech. `off` skips that step.", "",
             "| speech | overlap | mean | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for row in sorted(rows, key=lambda r: r["mean"]):
        cells = [f"{row['der'][n][0]:.1f} ({row['der'][n][1]:.1f} / {row['der'][n][2]:.1f} / {row['der'][n][3]:.1f})"
                 for n in names]
        off = lambda value: "off" if value is None else f"{value:g}"  # noqa: E731
        lines.append(f"| {off(row['speech'])} | {off(row['overlap'])} | {row['mean']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(found: replay.Found, model: str, sets: list[Path]) -> str:
    if any(outputs.counts is None for files in found.values() for _, outputs in files.values()):
        raise SystemExit("resegmentation: the model has no overlap head (model.overlap_head)")
    return to_markdown(grid(found, SPEECH, OVERLAP), model, sets)


def main() -> int:
    return replay.main(__doc__, report, "checkpoint with an overlap head (default: the shipped model)")


if __name__ == "__main__":
    sys.exit(main())
