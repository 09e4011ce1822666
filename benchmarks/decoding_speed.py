"""Greedy against beam-search decoding: warm x-real-time of the shipped pipeline on the same files, in one
process, alternating (greedy, beam, greedy, beam) so that the machine's noise falls on both. The decoder runs
on one torch thread and the frozen encoders on `--encoder-threads`, as `nanodrz diarize` does by default.

    .venv/bin/python benchmarks/decoding_speed.py benchmarks/results/v2_more_steps/sets/sets/clean --files 6
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf
import torch

from nanodrz.pipeline import Diarizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of WAV files")
    parser.add_argument("--files", type=int, default=6, help="the first N files of the folder")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--encoder-threads", type=int, default=2)
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    args = parser.parse_args()
    files = sorted(args.folder.glob("*.wav"))[:args.files]
    if not files:
        raise SystemExit(f"no WAV files in {args.folder}")
    torch.set_num_threads(1)
    diarizer = Diarizer.from_pretrained(args.model, encoder_threads=args.encoder_threads)
    greedy = diarizer.params
    beam = greedy.with_values({"decoding.strategy": "beam", "decoding.beam_size": args.beam_size})
    seconds = sum(sf.info(str(path)).duration for path in files)
    diarizer.run(files[0])  # warm-up
    for name, params in [("greedy", greedy), (f"beam {args.beam_size}", beam)] * 2:
        start = time.perf_counter()
        for path in files:
            diarizer.run(path, params=params)
        elapsed = time.perf_counter() - start
        print(f"{name}: {seconds:.0f} s of audio in {elapsed:.2f} s, {seconds / elapsed:.1f}x real time")


if __name__ == "__main__":
    main()
