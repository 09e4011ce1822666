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

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm
from nanodrz.diarize import ChunkOutputs, DiarizationSettings, Diarizer
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import score
from nanodrz.fileio import atomic_open

SPEECH = (None, 0.4, 0.5, 0.6, 0.7)
OVERLAP = (None, 0.6, 0.7, 0.75, 0.8, 0.9)


def collect(diarizer: Diarizer, sets: list[Path]) -> dict[str, dict[str, tuple[list[Turn], ChunkOutputs]]]:
    """set -> file -> (reference, what the chunks left for post-processing)."""
    found: dict[str, dict] = defaultdict(dict)
    for folder in tqdm(sets, desc="diarize", unit="set"):
        recordings = [(f"{folder.name}/{wav.stem}", str(wav)) for wav in sorted(folder.glob("*.wav"))]
        for name, outputs in diarizer.chunk_outputs_many(recordings):
            if isinstance(outputs, NanodrzError):
                raise SystemExit(f"resegmentation: {outputs}")
            if outputs.counts is None:
                raise SystemExit("resegmentation: the model has no overlap head (model.overlap_head)")
            [reference] = read_rttm(folder / f"{name.split('/')[1]}.rttm").values()
            found[folder.name][name] = (reference, outputs)
    return found


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", type=Path, help="a folder of set folders (WAV + RTTM), as `nanodrz sweep` writes")
    parser.add_argument("--model", required=True, help="checkpoint with an overlap head")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = sorted(path for path in args.sets.iterdir() if path.is_dir() and any(path.glob("*.wav")))
    if not sets:
        print(f"resegmentation: no set folders with WAV files under {args.sets}", file=sys.stderr)
        return 1
    diarizer = Diarizer.from_pretrained(args.model)
    rows = grid(collect(diarizer, sets), SPEECH, OVERLAP)
    table = to_markdown(rows, args.model, sets)
    print(table)
    if args.markdown:
        with atomic_open(args.markdown) as handle:
            handle.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
