"""Two rules on labels after re-labelling, each over a grid: the dominant-label split and small-label absorption.

The dominant-label split (`diarize.one_voice_heard_as_two`): a label that carries at least 90% of a recording's written speech is split in two
(`relabel.split_dominant_label`) when its voice blocks fall into two groups whose cosine is below
`TWO_VOICE_COSINE` (the smaller group at least `TWO_VOICE_SECONDS` long), or when the overlap head hears
at least 0.5 s of two voices at once and the groups' cosine is below `SAME_VOICE_COSINE`. The sets must
hold both kinds of recording the rule has to tell apart: dialogues where the model wrote one letter
for two voices, and monologues, where a split is always wrong. Each recording is diarized once; every
grid point then replays the post-processing (`diarize.finish_turns`) and is scored (DER, collar 0,
overlap scored) per set.

Small-label absorption (`relabel.absorb_small_labels`): a label with less than `MIN_LABEL_SECONDS` of
written speech joins the label with the closest voice. Its grid runs with the shipped split rule, and the
split grid with the shipped absorption.

The shipped values were chosen with this on validation speakers:

    B="--split validation --set num_speakers=2 --set duration=20 --set loudness_gap_db=[0,0]
       --set noise.probability=0 --set reverb.probability=0 --set telephone.probability=0"
    nanodrz simulate --preset clean $B --num 16 --seed 31 --set turns.target_overlap_ratio=0.1 --out S/ov0.1
    (likewise seeds 32 and 33 at overlap 0.2 and 0.3, and S/ov0.1-b and S/ov0.2-b: seeds 21 and 22, 24 and
    12 files, at 0.1 and 0.2)
    nanodrz simulate --preset overlap|phone --split validation --num 16 --seed 5 --out S/overlap|S/phone
    nanodrz simulate --preset clean|noisy|phone --split validation --num 16 --seed 4 \
        --set num_speakers=1 --set duration=40 --out S/mono-clean|S/mono-noisy|S/mono-phone
    (and S/mono-clean-b, S/mono-noisy-b, S/mono-phone-b: 8 more monologues each, --seed 3)
    ln -s benchmarks/results/validation_refined/sets/sets/PRESET S/val-PRESET   (the six validation presets)
    .venv/bin/python benchmarks/label_rules.py S --markdown benchmarks/results/label_rules.md
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from unittest import mock

import numpy as np
from tqdm import tqdm

import replay
from nanodrz import diarize
from nanodrz.diarize import DiarizationSettings
from nanodrz.evaluate import score

OFF = float("-inf")
TWO_VOICE_COSINE = (OFF, 0.8, 0.83, 0.85, 0.86, 0.88, 0.9)
TWO_VOICE_SECONDS = (2.0, 3.0, 5.0)
SAME_VOICE_COSINE = (float("inf"), 0.95)
MIN_LABEL_SECONDS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def der_per_set(found: replay.Found, **constants: float) -> dict[str, float]:
    """DER % per set with `nanodrz.diarize`'s rule constants set to `constants`."""
    der = {}
    with mock.patch.multiple(diarize, **constants):
        for set_name, files in sorted(found.items()):
            references = {name: reference for name, (reference, _) in files.items()}
            hypotheses = {name: outputs.finish(DiarizationSettings()) for name, (_, outputs) in files.items()}
            der[set_name] = 100 * score(references, hypotheses, collars=(0.0,)).total.at(0.0).der
    return der


def grids(found: replay.Found) -> tuple[list[dict], list[dict]]:
    """(rows of the split grid, rows of the absorption grid); each row: its constants, DER % per set, mean."""
    points = [p for p in itertools.product(TWO_VOICE_COSINE, TWO_VOICE_SECONDS, SAME_VOICE_COSINE)
               if p[0] != OFF or p[1] == TWO_VOICE_SECONDS[0]]
    split_rows, absorb_rows = [], []
    for cosine, seconds, same in tqdm(points, desc="split grid"):
        der = der_per_set(found, TWO_VOICE_COSINE=cosine, TWO_VOICE_SECONDS=seconds, SAME_VOICE_COSINE=same)
        split_rows.append({"constants": (cosine, seconds, same), "der": der, "mean": float(np.mean(list(der.values())))})
    for seconds in tqdm(MIN_LABEL_SECONDS, desc="absorption grid"):
        der = der_per_set(found, MIN_LABEL_SECONDS=seconds)
        absorb_rows.append({"constants": (seconds,), "der": der, "mean": float(np.mean(list(der.values())))})
    return split_rows, absorb_rows


def table(rows: list[dict], columns: list[str]) -> list[str]:
    names = sorted(rows[0]["der"])
    lines = ["| " + " | ".join(columns + names) + " | mean |", "|" + "---:|" * (len(columns) + len(names) + 1)]
    for row in rows:
        lines.append("| " + " | ".join([f"{c:g}" for c in row["constants"]] + [f"{row['der'][n]:.1f}" for n in names])
                     + f" | {row['mean']:.2f} |")
    return lines


def to_markdown(split_rows: list[dict], absorb_rows: list[dict], model: str, sets: list[Path]) -> str:
    lines = ["# Rules on labels after re-labelling, over grids", "",
             f"Model `{model}`; sets: {', '.join(f'`{s.name}`' for s in sets)} (validation speakers; `mono-*` are "
             "one-speaker recordings). DER %, collar 0, overlap scored, greedy, automatic speaker count.", "",
             "## The dominant-label split", "",
             "Rows with `-inf`: the rule before this grid (heard overlap alone). `-inf` = the voice-only condition off; "
             "`inf` = no same-voice guard. Shipped: 0.85 / 3 / 0.95.", ""]
    lines += table(split_rows, ["two-voice cosine", "smaller group s", "same-voice cosine"])
    lines += ["", "## Small-label absorption", "", "0 = off. Shipped: 1.5 s.", ""]
    lines += table(absorb_rows, ["min label s"])
    return "\n".join(lines) + "\n"


def main() -> int:
    return replay.main(__doc__, lambda found, model, sets: to_markdown(*grids(found), model, sets),
                       "checkpoint (default: the shipped model)")


if __name__ == "__main__":
    sys.exit(main())
