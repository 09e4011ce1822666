"""pyannote-style results of one recording, and the files `nanodrz diarize` writes from them.

pyannote.audio 4 pipelines return the regular diarization, an exclusive one (at most one speaker at a
time, which aligning ASR words to speakers needs) and one speaker embedding per label; `DiarizeOutput`
carries the same three, so code written against pyannote reads nanodrz's results unchanged. A label's
embedding is the unit mean of the model's window speaker embeddings (CAM++ space) over the frames where
that label talks alone, the voice that `postprocess` merges and re-labels by.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from nanodrz.annotation import Turn, format_rttm, to_annotation
from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_open
from nanodrz.postprocess.voices import Voices, elementary_pieces, mean_voices, solo_piece_frames, turn_frames

if TYPE_CHECKING:
    from pyannote.core import Annotation

OUTPUT_FORMATS = ("rttm", "exclusive-rttm", "json", "embeddings")


@dataclass(frozen=True, eq=False)
class DiarizeOutput:
    """One recording's result. `speaker_embeddings` has one row per label, in the order of `labels`
    (that of `speaker_diarization.labels()`, as in pyannote); None when the model computes no speaker
    embeddings (front ends without `voice_track`)."""

    uri: str
    turns: tuple[Turn, ...]
    exclusive_turns: tuple[Turn, ...]
    labels: tuple[str, ...]
    speaker_embeddings: np.ndarray | None

    @property
    def speaker_diarization(self) -> Annotation:
        return to_annotation(self.turns, uri=self.uri)

    @property
    def exclusive_speaker_diarization(self) -> Annotation:
        return to_annotation(self.exclusive_turns, uri=self.uri)


def exclusive(turns: Sequence[Turn], scores: Sequence[float]) -> list[Turn]:
    """One speaker at a time: overlapped stretches go to the turn the model was most sure of
    (ties: the turn that started first), as ASR word alignment needs."""
    bounds = sorted({t.start for t in turns} | {t.end for t in turns})
    pieces: list[Turn] = []
    for left, right in zip(bounds, bounds[1:]):
        active = [(score, -turn.start, turn.speaker) for turn, score in zip(turns, scores)
                  if turn.start <= left and turn.end >= right]
        if not active:
            continue
        speaker = max(active)[2]
        if pieces and pieces[-1].speaker == speaker and abs(pieces[-1].end - left) < 1e-9:
            pieces[-1] = Turn(pieces[-1].start, right, speaker)
        else:
            pieces.append(Turn(left, right, speaker))
    return pieces


def diarize_output(uri: str, turns: Sequence[Turn], scores: Sequence[float], exclusive_only: bool,
                   voices: Voices | None) -> DiarizeOutput:
    """A recording's final turns (with the model's confidence in each) as a `DiarizeOutput`; with
    `exclusive_only`, the regular diarization is the exclusive one too (`--exclusive`)."""
    flat = exclusive(turns, scores)
    regular = flat if exclusive_only else list(turns)
    labels = tuple(sorted({t.speaker for t in regular}))
    embeddings = None if voices is None else label_embeddings(regular, labels, voices)
    return DiarizeOutput(uri, tuple(regular), tuple(flat), labels, embeddings)


def label_embeddings(turns: Sequence[Turn], labels: Sequence[str], voices: Voices) -> np.ndarray:
    """(labels, E) unit voices: each label's mean window embedding where it talks alone; a label never
    heard alone gets its mean over all its turns, and a label with no frame at all a row of NaN."""
    alone = mean_voices(voices, solo_piece_frames(elementary_pieces(turns, [0.0] * len(turns)), voices))
    anywhere = mean_voices(voices, turn_frames(turns, voices))
    rows = np.full((len(labels), voices.frames.shape[1]), np.nan, dtype=np.float32)
    for row, label in enumerate(labels):
        found = alone.get(label) or anywhere.get(label)
        if found is not None:
            rows[row] = found[0]
    return rows


def parse_formats(value: str, to_folder: bool) -> set[str]:
    """The `--format` list; without an output folder, only one RTTM flavour (and JSON) fits on stdout."""
    formats = {f.strip() for f in value.split(",") if f.strip()}
    unknown = formats - set(OUTPUT_FORMATS)
    if unknown or not formats:
        raise NanodrzError(f"--format takes {', '.join(OUTPUT_FORMATS)}, not {', '.join(sorted(unknown)) or 'nothing'}")
    if not to_folder and "embeddings" in formats:
        raise NanodrzError("--format embeddings writes files: give --out FOLDER")
    if not to_folder and {"rttm", "exclusive-rttm"} <= formats:
        raise NanodrzError("--format rttm,exclusive-rttm on stdout would be indistinguishable: give --out FOLDER")
    return formats


def write_outputs(name: str, output: DiarizeOutput, out_dir: Path | None, formats: set[str], plot: bool) -> None:
    """NAME.rttm / .exclusive.rttm / .json / .embeddings.npz / .png under `out_dir` (in NAME's
    sub-folders), each written atomically; or the text formats on stdout."""
    relative = Path(name.replace(" ", "_"))
    uri = relative.name
    texts = {
        "rttm": (f"{uri}.rttm", lambda: format_rttm(output.turns, uri)),
        "exclusive-rttm": (f"{uri}.exclusive.rttm", lambda: format_rttm(output.exclusive_turns, uri)),
        "json": (f"{uri}.json", lambda: json.dumps(turns_to_json(uri, list(output.turns)),
                                                   indent=None if out_dir is None else 2) + "\n"),
    }
    for fmt, (file_name, text) in texts.items():
        if fmt not in formats:
            continue
        if out_dir is None:
            sys.stdout.write(text())
            continue
        with atomic_open(out_dir / relative.with_name(file_name)) as handle:
            handle.write(text())
    if "embeddings" in formats and out_dir is not None:
        with atomic_open(out_dir / relative.with_name(f"{uri}.embeddings.npz"), "wb") as handle:
            np.savez(handle, labels=np.array(output.labels, dtype=str), embeddings=output.speaker_embeddings)
    if plot:
        from nanodrz.plots import plot_timeline

        plot_timeline({"hypothesis": list(output.turns)}, (out_dir or Path(".")) / relative.with_name(f"{uri}.png"),
                      title=uri)


def turns_to_json(uri: str, turns: list[Turn]) -> dict:
    return {
        "uri": uri,
        "speakers": sorted({t.speaker for t in turns}),
        "turns": [{"start": round(t.start, 3), "end": round(t.end, 3), "speaker": t.speaker} for t in turns],
    }
