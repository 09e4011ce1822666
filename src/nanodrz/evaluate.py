"""Score diarization hypotheses against references: DER (missed, false alarm, confusion) and JER.

Conventions, stated once because they change the numbers:
* A collar of c seconds leaves c seconds on each side of every reference turn boundary unscored
  (the md-eval / dscore convention; pyannote.metrics' `collar` is the total width, so it gets 2c).
* Overlapped speech is scored. JER is scored without a collar (DIHARD convention).
* The scored region (UEM) of a file is, unless a UEM file is given, from 0 s to the end of its last
  reference turn, so hypothesis speech after the reference ends is not counted.
* Totals are pyannote's accumulated metrics (errors summed over files, then divided), not averages
  of per-file percentages.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

from nanodrz.annotation import Turn, read_rttm, record_lines, record_times, to_annotation
from nanodrz.errors import NanodrzError
from nanodrz.fileio import check_writable, write_json

DEFAULT_COLLARS = (0.0, 0.25)
TOTAL = "TOTAL"

Uem = dict[str, list[tuple[float, float]]]


@dataclass(frozen=True)
class DerScore:
    """DER at one collar, with its components in seconds of scored reference speech."""

    collar: float
    der: float
    scored: float
    missed: float
    false_alarm: float
    confusion: float

    def rate(self, seconds: float) -> float:
        """A component as a fraction of the scored reference speech."""
        return seconds / self.scored if self.scored > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "collar": self.collar,
            "der": self.der,
            "missed": self.rate(self.missed),
            "false_alarm": self.rate(self.false_alarm),
            "confusion": self.rate(self.confusion),
            "scored_seconds": self.scored,
            "missed_seconds": self.missed,
            "false_alarm_seconds": self.false_alarm,
            "confusion_seconds": self.confusion,
        }


@dataclass(frozen=True)
class FileScore:
    """Scores of one recording (or of all of them, for the total row)."""

    uri: str
    der: tuple[DerScore, ...]
    jer: float
    speech: float
    hypothesis_missing: bool = False

    def at(self, collar: float) -> DerScore:
        for score_at_collar in self.der:
            if math.isclose(score_at_collar.collar, collar):
                return score_at_collar
        raise KeyError(f"no DER at collar {collar}; scored collars: {[s.collar for s in self.der]}")

    def to_dict(self) -> dict:
        return {
            "uri": self.uri,
            "der": [score_at_collar.to_dict() for score_at_collar in self.der],
            "jer": self.jer,
            "speech_seconds": self.speech,
            "hypothesis_missing": self.hypothesis_missing,
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Per-file rows and accumulated totals; what `nanodrz sweep` and validation read."""

    collars: tuple[float, ...]
    files: tuple[FileScore, ...]
    total: FileScore
    missing_hypotheses: tuple[str, ...]
    unmatched_hypotheses: tuple[str, ...]
    uem_source: str

    def der(self, collar: float = 0.0) -> float:
        """Total DER at `collar`."""
        return self.total.at(collar).der

    def to_dict(self) -> dict:
        return {
            "collars": list(self.collars),
            "collar_convention": "seconds left unscored on each side of every reference boundary",
            "overlap_scored": True,
            "jer_collar": 0.0,
            "uem": self.uem_source,
            "files": [row.to_dict() for row in self.files],
            "total": self.total.to_dict(),
            "missing_hypotheses": list(self.missing_hypotheses),
            "unmatched_hypotheses": list(self.unmatched_hypotheses),
        }


def _check_collars(collars: Iterable[float]) -> tuple[float, ...]:
    checked = tuple(float(collar) for collar in collars)
    if not checked:
        raise NanodrzError("at least one collar is needed")
    if any(not math.isfinite(collar) or collar < 0 for collar in checked):
        raise NanodrzError(f"collars must be finite and >= 0, got {list(checked)}")
    if len(set(checked)) != len(checked):
        raise NanodrzError(f"collars must be distinct, got {list(checked)}")
    return checked


def _scored_region(uri: str, reference: list[Turn], hypothesis: list[Turn], uem: Uem | None) -> Timeline:
    """The UEM of one file: the given one, else 0 to the last reference end (hypothesis end if no reference)."""
    if uem is not None:
        if uri not in uem:
            raise NanodrzError(f"UEM has no entry for reference file {uri!r}")
        return Timeline([Segment(start, end) for start, end in uem[uri]], uri=uri)
    end = max((turn.end for turn in reference), default=max((turn.end for turn in hypothesis), default=0.0))
    return Timeline([Segment(0.0, end)] if end > 0 else [], uri=uri)


def _speech_seconds(reference: Annotation, region: Timeline) -> float:
    """Reference speech inside `region`, overlap counted once per speaker (DER's denominator at collar 0)."""
    cropped = reference.crop(region, mode="intersection")
    return float(sum(cropped.label_duration(label) for label in cropped.labels()))


def _der_score(collar: float, components: dict, der: float) -> DerScore:
    return DerScore(
        collar=collar,
        der=float(der),
        scored=float(components["total"]),
        missed=float(components["missed detection"]),
        false_alarm=float(components["false alarm"]),
        confusion=float(components["confusion"]),
    )


def score(
    references: dict[str, list[Turn]],
    hypotheses: dict[str, list[Turn]],
    collars: Sequence[float] = DEFAULT_COLLARS,
    uem: Uem | None = None,
) -> EvaluationReport:
    """Score every reference file; a reference without hypothesis counts as all missed.

    `collars` are in seconds on each side of a reference boundary; `uem` maps a file id to its
    scored (start, end) regions, default 0 to the end of the last reference turn.
    """
    collars = _check_collars(collars)
    if not references:
        raise NanodrzError("no reference files to score")
    # pyannote's collar is the full width centred on each boundary.
    der_metrics = [DiarizationErrorRate(collar=2 * collar, skip_overlap=False) for collar in collars]
    jer_metric = JaccardErrorRate(collar=0.0, skip_overlap=False)
    rows = []
    for uri in sorted(references):
        reference_turns, hypothesis_turns = references[uri], hypotheses.get(uri, [])
        reference = to_annotation(reference_turns, uri)
        hypothesis = to_annotation(hypothesis_turns, uri)
        region = _scored_region(uri, reference_turns, hypothesis_turns, uem)
        der = []
        for collar, metric in zip(collars, der_metrics):
            components = metric(reference, hypothesis, uem=region, detailed=True)
            der.append(_der_score(collar, components, components[metric.metric_name()]))
        jer = float(jer_metric(reference, hypothesis, uem=region))
        rows.append(FileScore(uri, tuple(der), jer, _speech_seconds(reference, region), uri not in hypotheses))
    total = FileScore(
        TOTAL,
        tuple(_der_score(collar, metric[:], abs(metric)) for collar, metric in zip(collars, der_metrics)),
        float(abs(jer_metric)),
        sum(row.speech for row in rows),
    )
    return EvaluationReport(
        collars=collars,
        files=tuple(rows),
        total=total,
        missing_hypotheses=tuple(row.uri for row in rows if row.hypothesis_missing),
        unmatched_hypotheses=tuple(sorted(set(hypotheses) - set(references))),
        uem_source="given by the caller" if uem is not None else "0 s to the end of the last reference turn of each file",
    )


def label_consistency(reference_turns: list[Turn], hypothesis_turns: list[Turn],
                      window: float = 30.0) -> tuple[float, float]:
    """How consistently a system keeps its labels over a long file, as (consistent, counted) seconds.

    The file is cut into `window`-second pieces. In each piece, every hypothesis label is matched to a
    reference speaker by the piece's own optimal mapping, and to one by the file-wide optimal mapping
    (the one DER uses); its speech in the piece counts as consistent when both agree. A label that
    switches to another voice halfway through, or two labels for one voice in different chunks, shows
    up as inconsistent time, even where a per-piece DER would look fine. Labels the piece's mapping
    leaves unmatched are not counted.
    """
    reference, hypothesis = to_annotation(reference_turns, "file"), to_annotation(hypothesis_turns, "file")
    if not hypothesis_turns or not reference_turns:
        return 0.0, 0.0
    metric = DiarizationErrorRate()
    file_wide = metric.optimal_mapping(reference, hypothesis)
    end = max(turn.end for turn in [*reference_turns, *hypothesis_turns])
    consistent = counted = 0.0
    for start in range(0, int(math.ceil(end / window))):
        piece = Segment(start * window, min((start + 1) * window, end))
        local_reference, local_hypothesis = reference.crop(piece), hypothesis.crop(piece)
        if not local_reference.labels() or not local_hypothesis.labels():
            continue
        for label, speaker in metric.optimal_mapping(local_reference, local_hypothesis).items():
            seconds = local_hypothesis.label_duration(label)
            counted += seconds
            consistent += seconds if file_wide.get(label) == speaker else 0.0
    return consistent, counted


def load_turns(path: str | Path, role: str) -> dict[str, list[Turn]]:
    """Read one RTTM holding many files, or a directory of *.rttm; files are keyed by the RTTM file id.

    In a directory, an RTTM without SPEAKER lines stands for its file stem with no speech (a
    system that found nobody speaking); a single RTTM without SPEAKER lines is an error.
    """
    path = Path(path)
    if not path.exists():
        raise NanodrzError(f"{role} not found: {path}")
    if path.is_file():
        turns = read_rttm(path)
        if not turns:
            raise NanodrzError(f"{role} RTTM has no SPEAKER lines: {path}")
        return turns
    rttm_files = sorted(path.glob("*.rttm"))
    if not rttm_files:
        raise NanodrzError(f"no *.rttm files in {role} directory {path}")
    result: dict[str, list[Turn]] = {}
    origin: dict[str, Path] = {}
    for rttm in rttm_files:
        for uri, turns in (read_rttm(rttm) or {rttm.stem: []}).items():
            if uri in result:
                raise NanodrzError(f"{role} file id {uri!r} is in both {origin[uri]} and {rttm}")
            result[uri], origin[uri] = turns, rttm
    return result


def read_uem(path: str | Path) -> Uem:
    """Read a UEM file (lines: file-id channel start end) into {file id: [(start, end), ...]}."""
    result: Uem = {}
    for where, fields in record_lines(path, "UEM"):
        if len(fields) != 4:
            raise NanodrzError(f"{where}: UEM line has {len(fields)} fields, expected 4 (file-id channel start end)")
        start, end = record_times(where, fields[2], fields[3], "start/end")
        if end < start:
            raise NanodrzError(f"{where}: need start <= end, got {start} {end}")
        result.setdefault(fields[0], []).append((start, end))
    if not result:
        raise NanodrzError(f"UEM file has no entries: {path}")
    return result


def format_table(report: EvaluationReport) -> str:
    """Aligned text table: per file DER/miss/FA/conf (%) at each collar, JER (%), speech seconds."""
    header = ["file"]
    for _ in report.collars:
        header += ["DER%", "miss%", "FA%", "conf%"]
    header += ["JER%", "speech s"]
    rows = []
    for row in (*report.files, report.total):
        cells = [row.uri + (" (no hyp)" if row.hypothesis_missing else "")]
        for der in row.der:
            cells += [f"{100 * value:.2f}" for value in (der.der, der.rate(der.missed), der.rate(der.false_alarm), der.rate(der.confusion))]
        cells += [f"{100 * row.jer:.2f}", f"{row.speech:.1f}"]
        rows.append(cells)
    widths = [max(len(line[column]) for line in (header, *rows)) for column in range(len(header))]
    group = [" " * widths[0]]
    for index, collar in enumerate(report.collars):
        span = sum(widths[1 + 4 * index : 5 + 4 * index]) + 3 * 2
        group.append(f"collar {collar:g} s".center(span, "-"))
    lines = ["  ".join(group).rstrip()]
    for number, line in enumerate((header, *rows)):
        if number == len(rows):
            lines.append("  ".join("-" * width for width in widths))
        lines.append("  ".join(cell.ljust(w) if column == 0 else cell.rjust(w) for column, (cell, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ref", required=True, help="reference RTTM file, or directory of *.rttm")
    parser.add_argument("--hyp", required=True, help="hypothesis RTTM file, or directory of *.rttm")
    parser.add_argument(
        "--collar",
        type=float,
        nargs="+",
        default=list(DEFAULT_COLLARS),
        help="seconds left unscored on each side of every reference boundary (default: 0 0.25)",
    )
    parser.add_argument("--uem", help="UEM file (file-id channel start end); default: 0 s to the last reference end")
    parser.add_argument("--json", help="also write per-file and total scores to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "--json")
    references = load_turns(args.ref, "reference")
    hypotheses = load_turns(args.hyp, "hypothesis")
    if not set(references) & set(hypotheses):
        raise NanodrzError(f"no hypothesis file id matches a reference file id (references: "
                           f"{', '.join(sorted(references)[:5])}; hypotheses: {', '.join(sorted(hypotheses)[:5])}): "
                           "are --ref and --hyp about the same recordings?")
    uem = read_uem(args.uem) if args.uem else None
    report = score(references, hypotheses, collars=args.collar, uem=uem)
    if report.unmatched_hypotheses:
        print(
            f"nanodrz evaluate: WARNING: {len(report.unmatched_hypotheses)} hypothesis file(s) have no reference "
            "and are NOT scored: " + ", ".join(report.unmatched_hypotheses),
            file=sys.stderr,
        )
    if report.missing_hypotheses:
        print(
            f"nanodrz evaluate: warning: no hypothesis for {len(report.missing_hypotheses)} reference file(s), "
            "scored as all missed: " + ", ".join(report.missing_hypotheses),
            file=sys.stderr,
        )
    print(format_table(report))
    print(
        f"UEM: {args.uem or report.uem_source}. Collar: seconds unscored on each side of reference boundaries. "
        "Overlap scored. JER without collar. TOTAL = accumulated over files."
    )
    if args.json:
        data = report.to_dict()
        if args.uem:
            data["uem"] = str(args.uem)
        write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0
