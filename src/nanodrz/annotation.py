"""The plain data model at module borders: a speech `Turn`, and conversions to pyannote and RTTM.

`pyannote.core.Annotation` is the public interchange type; RTTM is the file format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pyannote.core import Annotation, Segment

from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_open

RTTM_TYPE = re.compile(r"[A-Z][A-Z_/-]*")  # SPEAKER, SPKR-INFO, NON-SPEECH, A/P, ...


@dataclass(frozen=True, order=True)
class Turn:
    """One stretch of speech by one speaker, in seconds from the start of the recording."""

    start: float
    end: float
    speaker: str

    @property
    def duration(self) -> float:
        return self.end - self.start


def sort_turns(turns: Iterable[Turn]) -> list[Turn]:
    """Turns ordered by start time, ties broken by end time then speaker."""
    return sorted(turns, key=lambda t: (t.start, t.end, t.speaker))


def to_annotation(turns: Iterable[Turn], uri: str = "audio") -> Annotation:
    """A pyannote Annotation with one track per turn (overlapping same-speaker turns stay separate tracks)."""
    annotation = Annotation(uri=uri)
    for index, turn in enumerate(sort_turns(turns)):
        if turn.end > turn.start:
            annotation[Segment(turn.start, turn.end), index] = turn.speaker
    return annotation


def from_annotation(annotation: Annotation) -> list[Turn]:
    """Turns of a pyannote Annotation, sorted."""
    return sort_turns(
        Turn(float(segment.start), float(segment.end), str(label))
        for segment, _, label in annotation.itertracks(yield_label=True)
    )


def format_rttm(turns: Iterable[Turn], uri: str) -> str:
    """RTTM lines (SPEAKER uri 1 start duration <NA> <NA> speaker <NA> <NA>), 3 decimals."""
    if not uri or any(c.isspace() for c in uri):
        raise NanodrzError(f"RTTM file id must be non-empty without spaces, got {uri!r}")
    lines = []
    for turn in sort_turns(turns):
        if turn.end <= turn.start:
            continue
        speaker = turn.speaker.replace(" ", "_")
        lines.append(
            f"SPEAKER {uri} 1 {turn.start:.3f} {turn.end - turn.start:.3f} <NA> <NA> {speaker} <NA> <NA>\n"
        )
    return "".join(lines)


def write_rttm(path: str | Path, turns_by_uri: dict[str, list[Turn]]) -> None:
    """Write one RTTM file (atomically) holding every recording in `turns_by_uri`."""
    with atomic_open(path) as handle:
        for uri, turns in turns_by_uri.items():
            handle.write(format_rttm(turns, uri))


def read_rttm(path: str | Path) -> dict[str, list[Turn]]:
    """Read an RTTM file into {uri: turns}; malformed lines are a one-line error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise NanodrzError(f"RTTM file not found: {path}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise NanodrzError(f"{path}: not an RTTM file (binary content)")
    result: dict[str, list[Turn]] = {}
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith((";", "#")):
            continue
        if not RTTM_TYPE.fullmatch(fields[0]) or len(fields) < 8:
            raise NanodrzError(f"{path}:{number}: not an RTTM line (expected 'SPEAKER file 1 start duration "
                               "<NA> <NA> speaker <NA> <NA>')")
        if fields[0] != "SPEAKER":  # SPKR-INFO, LEXEME, NON-SPEECH, ...: not turns
            continue
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise NanodrzError(f"{path}:{number}: start/duration are not numbers") from None
        if not (math.isfinite(start) and math.isfinite(duration)) or start < 0 or duration < 0:
            raise NanodrzError(f"{path}:{number}: negative or non-finite time")
        result.setdefault(fields[1], []).append(Turn(start, start + duration, fields[7]))
    return {uri: sort_turns(turns) for uri, turns in result.items()}
