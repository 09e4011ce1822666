"""Choose `PyannoteSettings.embedding_layer` and `.threshold` on validation speakers: DER (collar 0, overlap
scored) per set and its mean over sets, for each embedding layer and a grid of clustering thresholds.

Segmentation and embeddings do not depend on the threshold, so each file is analysed once per embedding
layer and only clustering and reconstruction run per grid point. Give it folders written by `nanodrz
simulate --split validation` (never test speakers, never the real sample):

    python benchmarks/pyannote_threshold.py out/val/clean out/val/overlap out/val/phone out/val/noisy \
        --embedding-layers relu,batchnorm,linear --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanodrz.audio import SAMPLE_RATE
from nanodrz.baseline import PyannoteBaseline, PyannoteSettings, read_mono
from nanodrz.evaluate import load_turns, score

DEFAULT_GRID = "0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", type=Path, help="folders of <id>.wav and <id>.rttm")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"comma-separated thresholds (default: {DEFAULT_GRID})")
    parser.add_argument("--embedding-layers", default=PyannoteSettings.embedding_layer,
                        help="comma-separated CAM++ embedding layers: linear, batchnorm, relu "
                             f"(default: {PyannoteSettings.embedding_layer})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = [float(value) for value in args.grid.split(",")]
    layers = args.embedding_layers.split(",")
    references = {folder.name: load_turns(folder, "reference") for folder in args.sets}
    ders = {}
    for layer in layers:
        baseline = PyannoteBaseline(PyannoteSettings(embedding_layer=layer))
        start, audio_seconds, analyses = time.perf_counter(), 0.0, {}
        for folder in args.sets:
            for uri in references[folder.name]:
                audio = read_mono(folder / f"{uri}.wav")
                audio_seconds += len(audio) / SAMPLE_RATE
                analyses[folder.name, uri] = baseline.windowed_speakers(audio)
        print(f"{layer}: {len(analyses)} files, {audio_seconds:.0f} s of audio analysed in "
              f"{(time.perf_counter() - start) / audio_seconds:.3f} s per second", file=sys.stderr)
        for threshold in grid:
            settings = dataclasses.replace(baseline.settings, threshold=threshold)
            for name, truth in references.items():
                hypotheses = {uri: baseline.turns(analyses[name, uri], settings) for uri in truth}
                ders[layer, threshold, name] = score(truth, hypotheses).der(0.0)
    names = [folder.name for folder in args.sets]
    print("| embedding layer | threshold | " + " | ".join(f"{name} DER %" for name in names) + " | mean DER % |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for layer in layers:
        for threshold in grid:
            row = [100 * ders[layer, threshold, name] for name in names]
            print(f"| {layer} | {threshold:g} | " + " | ".join(f"{value:.1f}" for value in row) + f" | {np.mean(row):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
