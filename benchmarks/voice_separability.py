"""How well frozen CAM++ features tell two positions' voices apart, by the window they are pooled over.

For each conversation (WAV + RTTM, as written by `nanodrz simulate`), every 40 ms position where exactly
one reference speaker talks is a candidate; 3000 random pairs of candidates are scored by the cosine of
their vectors, and the ROC AUC of same-speaker against different-speaker pairs is averaged over the
conversations. Two vectors are compared for each window length: the mean of CAM++'s trunk features over
the window (what the `campplus` front end's projection sees, roughly), and CAM++'s own speaker
embedding of the window (what `campplus_windows` adds). This is the measurement behind the window
length of `features.WindowedSpeakerFrontEnd`.

    nanodrz simulate --preset clean --split validation --num 12 --seed 7 --out /tmp/val-clean
    .venv/bin/python benchmarks/voice_separability.py /tmp/val-clean [more folders] [--windows 0.5,1,1.5,2.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from nanodrz.audio import load_audio
from nanodrz.evaluate import load_turns
from nanodrz.features import WindowedSpeakerFrontEnd

PAIRS = 3000
FRAME_RATE = 25.0


def single_speaker_positions(turns, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of positions where exactly one speaker talks, and that speaker's index."""
    speakers = sorted({turn.speaker for turn in turns})
    times = np.arange(num_positions) / FRAME_RATE
    active = np.zeros((len(speakers), num_positions), dtype=bool)
    for turn in turns:
        active[speakers.index(turn.speaker)] |= (times >= turn.start) & (times < turn.end)
    positions = np.flatnonzero(active.sum(0) == 1)
    return positions, active[:, positions].argmax(0)


def pair_auc(vectors: torch.Tensor, positions: np.ndarray, who: np.ndarray, rng: np.random.Generator) -> float:
    first, second = rng.integers(0, len(positions), PAIRS), rng.integers(0, len(positions), PAIRS)
    same = who[first] == who[second]
    if same.all() or not same.any():
        return float("nan")
    cosine = (vectors[positions[first]] * vectors[positions[second]]).sum(-1).numpy()
    return float(roc_auc_score(same, cosine))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--windows", default="0.5,1,1.5,2.5", help="window lengths in seconds (default: %(default)s)")
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    front_ends = {w: WindowedSpeakerFrontEnd(32, FRAME_RATE, window_seconds=w) for w in windows}
    print("folder | window s | trunk-mean AUC | embedding AUC")
    for folder in args.folders:
        wavs = sorted(folder.glob("*.wav"))
        if not wavs:
            print(f"voice_separability: no .wav files in {folder}", file=sys.stderr)
            return 2
        references = load_turns(folder, "reference")
        scores: dict[tuple[float, str], list[float]] = {}
        for wav in wavs:
            turns = references[wav.stem]
            features = front_ends[windows[0]].encode(torch.from_numpy(load_audio(wav)))
            for window, front_end in front_ends.items():
                embeddings = front_end.window_embeddings(features)
                kernel = dict(kernel_size=front_end.window, stride=front_end.stride, padding=front_end.window // 2)
                means = F.avg_pool1d(features.T[None], count_include_pad=False, **kernel)[0].T
                positions, who = single_speaker_positions(turns, len(embeddings))
                for name, vectors in (("trunk", F.normalize(means, dim=-1)), ("embedding", embeddings)):
                    rng = np.random.default_rng(0)
                    scores.setdefault((window, name), []).append(pair_auc(vectors, positions, who, rng))
        for window in windows:
            trunk, embedding = (np.nanmean(scores[(window, name)]) for name in ("trunk", "embedding"))
            print(f"{folder} | {window:g} | {trunk:.3f} | {embedding:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
