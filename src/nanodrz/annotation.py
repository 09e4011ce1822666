"""The plain data model at module borders: a speech `Turn`, and conversions to pyannote and RTTM.

`pyannote.core.Annotation` is the public interchange type; RTTM is the file format. `record_lines`
and `record_times` read the lines of NIST text files, so RTTM and UEM (`evaluate.read_uem`) files are
refused for the same reasons with the same messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator


from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_open

if TYPE_CHECKING:
    from pyannote.core import Annotation

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
    from pyannote.core import Annotation, Segment  # here: pyannote.core imports matplotlib and scipy.stats

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
    result: dict[str, list[Turn]] = {}
    for where, fields in record_lines(path, "RTTM"):
        if not RTTM_TYPE.fullmatch(fields[0]) or len(fields) < 8:
            raise NanodrzError(f"{where}: not an RTTM line (expected 'SPEAKER file 1 start duration "
                               "<NA> <NA> speaker <NA> <NA>')")
        if fields[0] != "SPEAKER":  # SPKR-INFO, LEXEME, NON-SPEECH, ...: not turns
            continue
        start, duration = record_times(where, fields[3], fields[4], "start/duration")
        result.setdefault(fields[1], []).append(Turn(start, start + duration, fields[7]))
    return {uri: sort_turns(turns) for uri, turns in result.items()}


def record_lines(path: str | Path, kind: str) -> Iterator[tuple[str, list[str]]]:
    """("file:line", fields) of each line of a NIST text file (RTTM, UEM) that is not blank or a comment;
    a missing or binary file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise NanodrzError(f"{kind} file not found: {path}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise NanodrzError(f"{path}: not an {kind} file (binary content)")
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith((";", "#")):
            yield f"{path}:{number}", fields


def record_times(where: str, first: str, second: str, names: str) -> tuple[float, float]:
    """Two times of a record line, each a finite number of seconds >= 0, or a one-line error at `where`."""
    try:
        values = float(first), float(second)
    except ValueError:
        raise NanodrzError(f"{where}: {names} are not numbers") from None
    if not all(math.isfinite(value) and value >= 0 for value in values):
        raise NanodrzError(f"{where}: {names} must be finite and not negative, got {first} {second}")
    return values
