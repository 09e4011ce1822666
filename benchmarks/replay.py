"""Shared by the post-processing benchmarks: decode set folders once, then replay post-processing at will.

A set folder holds WAV files with RTTM references beside them (as `nanodrz simulate` and `nanodrz sweep`
write them). Each recording is decoded once (`Diarizer.chunk_outputs_many`); a benchmark then calls
`ChunkOutputs.finish(settings)` for every grid point and scores the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm
from nanodrz.decoding import DecodingOptions
from nanodrz.diarize import ChunkOutputs, DiarizationSettings, Diarizer
from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_open

# set -> file -> (reference turns, what the chunks left for post-processing)
Found = dict[str, dict[str, tuple[list[Turn], ChunkOutputs]]]


def collect(diarizer: Diarizer, sets: list[Path], decoding: DecodingOptions | None = None) -> Found:
    found: Found = {}
    settings = DiarizationSettings(decoding=decoding or DecodingOptions())
    for folder in tqdm(sets, desc="diarize", unit="set"):
        recordings = [(f"{folder.name}/{wav.stem}", str(wav)) for wav in sorted(folder.glob("*.wav"))]
        for name, outputs in diarizer.chunk_outputs_many(recordings, settings):
            if isinstance(outputs, NanodrzError):
                raise SystemExit(f"{Path(sys.argv[0]).stem}: {outputs}")
            # An RTTM without SPEAKER lines is a recording where nobody speaks.
            reference = next(iter(read_rttm(folder / f"{name.split('/')[1]}.rttm").values()), [])
            found.setdefault(folder.name, {})[name] = (reference, outputs)
    return found


def main(description: str, report: Callable[[Found, str, list[Path]], str], model_help: str,
         default_threads: int = 2) -> int:
    """Parse `SETS [--model M] [--markdown FILE] [--threads N]`, decode the sets, print `report(found, model,
    sets)` and write it to FILE atomically."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("sets", type=Path, help="a folder of set folders (WAV + RTTM)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--threads", type=int, default=default_threads)
    parser.add_argument("--eos-penalty", type=float, default=DecodingOptions.eos_penalty,
                        help="decoding's EOS penalty (decoding is not replayed: one value per run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = sorted(path for path in args.sets.iterdir() if path.is_dir() and any(path.glob("*.wav"))) \
        if args.sets.is_dir() else []
    if not sets:
        print(f"{Path(sys.argv[0]).stem}: no set folders with WAV files under {args.sets}", file=sys.stderr)
        return 1
    diarizer = Diarizer.from_pretrained(args.model)
    text = report(collect(diarizer, sets, DecodingOptions(eos_penalty=args.eos_penalty)),
                  f"{args.model or 'shipped'}, EOS penalty {args.eos_penalty:g}", sets)
    print(text)
    if args.markdown:
        with atomic_open(args.markdown) as handle:
            handle.write(text)
    return 0
