"""Choose `PyannoteSettings.threshold` on validation speakers: DER (collar 0, overlap scored) per set and
its mean over sets, for a grid of clustering thresholds.

Segmentation and embeddings do not depend on the threshold, so each file is analysed once and only
clustering and reconstruction run per grid point. Give it folders written by `nanodrz simulate --split
validation` (never test speakers, never the real sample):

    python benchmarks/pyannote_threshold.py out/val/clean out/val/overlap out/val/phone --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from nanodrz.annotation import read_rttm
from nanodrz.baseline import PyannoteBaseline, PyannoteSettings, read_mono
from nanodrz.evaluate import score

DEFAULT_GRID = "0.5,0.55,0.6,0.65,0.7,0.75,0.8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", type=Path, help="folders of <id>.wav and <id>.rttm")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"comma-separated thresholds (default: {DEFAULT_GRID})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = [float(value) for value in args.grid.split(",")]
    baseline = PyannoteBaseline()
    ders = {}
    for folder in args.sets:
        references = {}
        for rttm in sorted(folder.glob("*.rttm")):
            references.update(read_rttm(rttm))
        analyses = {uri: baseline.windowed_speakers(read_mono(folder / f"{uri}.wav")) for uri in references}
        for threshold in grid:
            settings = dataclasses.replace(baseline.settings, threshold=threshold)
            hypotheses = {uri: baseline.turns(analysis, settings) for uri, analysis in analyses.items()}
            ders[folder.name, threshold] = score(references, hypotheses).der(0.0)
        print(f"{folder.name}: {len(references)} files analysed", file=sys.stderr)
    names = [folder.name for folder in args.sets]
    print("| threshold | " + " | ".join(f"{name} DER %" for name in names) + " | mean DER % |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for threshold in grid:
        row = [100 * ders[name, threshold] for name in names]
        print(f"| {threshold:g} | " + " | ".join(f"{value:.1f}" for value in row) + f" | {np.mean(row):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
