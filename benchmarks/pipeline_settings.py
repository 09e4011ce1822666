"""Post-processing of a model, rule by rule and threshold by threshold, on validation speakers.

Each recording of the validation sets (`benchmarks/validation_sets.sh`) is decoded once
(`Diarizer.chunk_outputs_many`); every row then replays the whole post-processing of `nanodrz diarize`
under its settings and is scored per set:
- sets with speech (the six presets, `mono-*` one-speaker recordings): DER % (collar 0, overlap scored);
  for `mono-*` also the share of recordings with exactly one speaker;
- sets with no speech at all (`noise`, `music`, `tones`): seconds of speech written per minute.

Rows: the shipped settings; each rule switched off alone (its gain is the difference); the segmentation-3.0
gate (`--nonspeech-threshold`) and the resegmentation thresholds over one joint grid. The choice rule: the lowest mean DER over the sets with speech among rows that
write at most 1 s of speech per minute of non-speech (the target of the real-recordings issue).

    bash benchmarks/validation_sets.sh
    .venv/bin/python benchmarks/pipeline_settings.py data/validation_sets --model MODEL \
        --markdown benchmarks/results/pipeline_settings.md
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
from tqdm import tqdm

import replay
from nanodrz import diarize
from nanodrz.annotation import Turn
from nanodrz.diarize import DiarizationSettings
from nanodrz.evaluate import score
from nanodrz.resegment import OVERLAP_THRESHOLD, SPEECH_THRESHOLD

NO_SPEECH_SETS = ("noise", "music", "tones")
MAX_FALSE_ALARM_PER_MINUTE = 1.0
SPEECH_GRID = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
OVERLAP_GRID = (None, 0.7, 0.8, 0.9)
NONSPEECH_GRID = (None, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Row:
    name: str
    settings: DiarizationSettings = field(default_factory=DiarizationSettings)
    constants: dict = field(default_factory=dict)  # rule constants of `nanodrz.diarize` switched for this row


def rows() -> list[Row]:
    shipped = DiarizationSettings()
    table = [
        Row("shipped settings"),
        Row("no voice merging", DiarizationSettings(merge_threshold=float("inf"))),
        Row("no voice re-labelling", DiarizationSettings(refine_passes=0)),
        Row("no dominant-label split", constants={"TWO_VOICE_COSINE": float("-inf"), "SAME_VOICE_COSINE": float("-inf")}),
        Row("no small-label absorption", constants={"MIN_LABEL_SECONDS": 0.0}),
        Row("no resegmentation", DiarizationSettings(speech_threshold=None, overlap_threshold=None)),
    ]
    for nonspeech, speech, overlap in itertools.product(NONSPEECH_GRID, SPEECH_GRID, OVERLAP_GRID):
        point = DiarizationSettings(speech_threshold=speech, overlap_threshold=overlap, nonspeech_threshold=nonspeech)
        if point != shipped and (speech, overlap, nonspeech) != (None, None, shipped.nonspeech_threshold):
            table.append(Row(f"gate {off(nonspeech)}, speech {off(speech)}, overlap {off(overlap)}", point))
    return table


def off(value: float | None) -> str:
    return "off" if value is None else f"{value:g}"


def written_seconds(turns: list[Turn]) -> float:
    """Seconds in which at least one speaker is written."""
    total, end = 0.0, float("-inf")
    for turn in sorted(turns, key=lambda t: t.start):
        start = max(turn.start, end)
        if turn.end > start:
            total += turn.end - start
        end = max(end, turn.end)
    return total


def evaluate(found: replay.Found, row: Row, durations: dict[str, float]) -> dict[str, float]:
    """Per set: DER % (speech sets), speech seconds per minute (no-speech sets), and `mono-*` count exact %."""
    patches = mock.patch.multiple(diarize, **row.constants) if row.constants else contextlib.nullcontext()
    result = {}
    with patches:
        for set_name, files in sorted(found.items()):
            hypotheses = {name: outputs.finish(row.settings) for name, (_, outputs) in files.items()}
            if set_name in NO_SPEECH_SETS:
                seconds = sum(durations[name] for name in files)
                result[set_name] = sum(written_seconds(h) for h in hypotheses.values()) / (seconds / 60)
                continue
            references = {name: reference for name, (reference, _) in files.items()}
            result[set_name] = 100 * score(references, hypotheses, collars=(0.0,)).total.at(0.0).der
            if set_name.startswith("mono-"):
                exact = [len({t.speaker for t in turns}) == 1 for turns in hypotheses.values()]
                result[f"{set_name} #1"] = 100 * float(np.mean(exact))
    return result


def to_markdown(found: replay.Found, model: str, sets: list[Path]) -> str:
    import soundfile as sf

    durations = {f"{folder.name}/{wav.stem}": sf.info(str(wav)).duration for folder in sets for wav in folder.glob("*.wav")}
    measured = [(row, evaluate(found, row, durations)) for row in tqdm(rows(), desc="rows")]
    speech_sets = [name for name in sorted(found) if name not in NO_SPEECH_SETS]
    quiet_sets = [name for name in sorted(found) if name in NO_SPEECH_SETS]
    columns = speech_sets + [f"{name} #1" for name in speech_sets if name.startswith("mono-")] + quiet_sets
    lines = ["# Post-processing on validation speakers: `benchmarks/pipeline_settings.py`", "",
             f"Model `{model}`; sets under `{sets[0].parent}`. DER % (collar 0, overlap scored) for sets with speech; "
             "`#1`: % of one-speaker recordings given exactly one speaker; `noise`, `music`, `tones`: seconds of speech "
             f"written per minute where nobody speaks. Shipped thresholds: speech {SPEECH_THRESHOLD:g}, overlap "
             f"{OVERLAP_THRESHOLD:g}. Chosen: lowest mean DER among rows at most {MAX_FALSE_ALARM_PER_MINUTE:g} s/min "
             "on every no-speech set (marked **).", "",
             "| row | mean DER | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    means = {row.name: float(np.mean([values[name] for name in speech_sets])) for row, values in measured}
    allowed = [row.name for row, values in measured
               if all(values[name] <= MAX_FALSE_ALARM_PER_MINUTE for name in quiet_sets)]
    chosen = min(allowed, key=means.get) if allowed else None
    for row, values in measured:
        label = f"**{row.name}**" if row.name == chosen else row.name
        lines.append(f"| {label} | {means[row.name]:.2f} | " + " | ".join(f"{values[c]:.1f}" for c in columns) + " |")
    lines += ["", f"Chosen: {chosen or 'none meets the non-speech limit'}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    return replay.main(__doc__, to_markdown, "checkpoint (default: the shipped model)")


if __name__ == "__main__":
    sys.exit(main())
