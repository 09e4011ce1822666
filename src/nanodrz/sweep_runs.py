"""How `nanodrz sweep` runs systems on its sets: timed diarization, a hypotheses RTTM per set, scores
by `evaluate.score`, and the rows of results.json.

A system is a function from a set to (hypotheses, failures). A set holding the same files as one
already run (the base set at the start of every axis) reuses that run; a baseline's run from an
earlier sweep on unchanged files can be reused too, since baselines do not depend on our model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm, write_rttm
from nanodrz.params import DiarizationSettings
from nanodrz.pipeline import Diarizer
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import DEFAULT_COLLARS, EvaluationReport, label_consistency, score
from nanodrz.fileio import atomic_path
from nanodrz.simulate import speech_activity
from nanodrz.sweep_sets import TestSet, audio_seconds

CONSISTENCY_WINDOW = 30.0  # seconds; see `evaluate.label_consistency`
# A system: diarize a set, advancing the progress bar per file; (hypotheses by file id, failures).
System = Callable[[TestSet, tqdm], tuple[dict[str, list[Turn]], list[str]]]


@dataclass
class SystemResult:
    """One system on one set: its scores, speed and speaker counts."""

    report: EvaluationReport
    processing_seconds: float
    audio_seconds: float
    hypothesis_speakers: dict[str, int]
    failed: list[str]
    hypotheses: str  # RTTM path relative to the output folder
    consistency: tuple[float, float] = (0.0, 0.0)  # (consistent, counted) seconds over files longer than a window
    same_as: str | None = None

    @property
    def label_consistency(self) -> float | None:
        return self.consistency[0] / self.consistency[1] if self.consistency[1] > 0 else None

    @property
    def real_time_factor(self) -> float:
        return self.processing_seconds / self.audio_seconds if self.audio_seconds > 0 else float("nan")

    def speaker_count(self, references: dict[str, list[Turn]]) -> tuple[float, float]:
        """Share of files with exactly the reference number of speakers, and the mean absolute error."""
        errors = [abs(self.hypothesis_speakers.get(uri, 0) - count_speakers(turns)) for uri, turns in references.items()]
        return sum(error == 0 for error in errors) / len(errors), sum(errors) / len(errors)


def count_speakers(turns: list[Turn]) -> int:
    return len({turn.speaker for turn in turns})


def hypotheses_path(system: str, test_set: TestSet) -> Path:
    return Path("hypotheses") / system / test_set.group / f"{test_set.name}.rttm"


def run_system(name: str, diarize_set: System, test_set: TestSet, out: Path, seconds: float) -> SystemResult:
    """Diarize a set with one system (timed), write its hypotheses RTTM and score it."""
    relative = hypotheses_path(name, test_set)
    with tqdm(total=len(test_set.recordings), desc=f"{name} {test_set.key}", unit="file", leave=False,
              file=sys.stderr) as bar:
        started = time.perf_counter()
        hypotheses, failed = diarize_set(test_set, bar)
        elapsed = time.perf_counter() - started
    write_rttm(out / relative, hypotheses)
    return scored_result(relative, list(hypotheses), test_set, out, elapsed, seconds, failed)


def scored_result(relative: Path, uris: list[str], test_set: TestSet, out: Path, elapsed: float, seconds: float,
                  failed: list[str]) -> SystemResult:
    """Score a hypotheses RTTM written for `test_set` (`uris`: the files it covers, even with no turns)."""
    # Score what was written (times to the millisecond), so `nanodrz evaluate` on the files agrees exactly.
    hypotheses = {uri: [] for uri in uris} | read_rttm(out / relative)
    report = score(test_set.references, hypotheses, collars=DEFAULT_COLLARS)
    speakers = {uri: count_speakers(turns) for uri, turns in hypotheses.items()}
    long_files = [uri for uri, turns in test_set.references.items()
                  if turns and max(t.end for t in turns) > CONSISTENCY_WINDOW]
    pieces = [label_consistency(test_set.references[uri], hypotheses.get(uri, []), CONSISTENCY_WINDOW)
              for uri in long_files]
    consistency = (sum(c for c, _ in pieces), sum(n for _, n in pieces))
    return SystemResult(report, elapsed, seconds, speakers, failed, str(relative), consistency)


def earlier_baseline_runs(out: Path, system: str, recipe: dict) -> dict[str, dict]:
    """{set fingerprint: that set's row entry for `system`} from an earlier sweep in `out` (its
    results.json), for the simulated sets whose hypotheses file is still there; none when that sweep ran
    the baseline with another recipe (e.g. another clustering threshold), whose answers may differ."""
    path = out / "results.json"
    if not path.is_file():
        raise NanodrzError(f"--reuse-baseline: no earlier results.json in {out}")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise NanodrzError(f"--reuse-baseline: {path} is unreadable ({error})") from None
    if earlier.get("baseline_recipes", {}).get(system) != recipe:
        print(f"--reuse-baseline: the earlier {system} run in {out} used other settings; running it again",
              file=sys.stderr)
        return {}
    runs = {}
    for group in earlier.get("groups", []):
        for row in group.get("rows", []):
            entry = row.get("systems", {}).get(system)
            if row.get("fingerprint") and entry and not entry.get("failed") and (out / entry["hypotheses"]).is_file():
                runs[row["fingerprint"]] = entry
    return runs


def earlier_run_result(entry: dict, name: str, test_set: TestSet, out: Path, seconds: float) -> SystemResult:
    """A baseline's earlier run on the very same files: its hypotheses, rescored, and its timing."""
    relative = hypotheses_path(name, test_set)
    if out / relative != out / entry["hypotheses"]:
        with atomic_path(out / relative) as tmp:
            shutil.copyfile(out / entry["hypotheses"], tmp)
    return scored_result(relative, [uri for uri, _ in test_set.recordings], test_set, out,
                         entry["processing_seconds"], seconds, [])


def same_files_result(earlier: SystemResult, source: str, name: str, test_set: TestSet, out: Path) -> SystemResult:
    """The result of a set with the same files (e.g. the base set at the start of every axis), under this row."""
    relative = hypotheses_path(name, test_set)
    with atomic_path(out / relative) as tmp:
        shutil.copyfile(out / earlier.hypotheses, tmp)
    return dataclasses.replace(earlier, hypotheses=str(relative), same_as=source)


def nanodrz_system(diarizer: Diarizer, batch_size: int, settings: DiarizationSettings) -> System:
    """Our diarizer, batched as `nanodrz diarize` runs it."""
    def diarize_set(test_set: TestSet, bar: tqdm) -> tuple[dict[str, list[Turn]], list[str]]:
        hypotheses, failed = {}, []
        for uri, outcome in diarizer.diarize_many(test_set.recordings, settings, batch_size=batch_size):
            if isinstance(outcome, NanodrzError):
                failed.append(str(outcome))
            else:
                hypotheses[uri] = outcome
            bar.update(1)
        return hypotheses, failed
    return diarize_set


def baseline_system(baseline: Callable[[Path], list[Turn]]) -> System:
    """A baseline of `baseline.py`, one file at a time."""
    def diarize_set(test_set: TestSet, bar: tqdm) -> tuple[dict[str, list[Turn]], list[str]]:
        hypotheses, failed = {}, []
        for uri, path in test_set.recordings:
            try:
                hypotheses[uri] = baseline(path)
            except NanodrzError as error:
                failed.append(f"{uri}: {error}")
            bar.update(1)
        return hypotheses, failed
    return diarize_set


def row_summary(test_set: TestSet, seconds: float, results: dict[str, SystemResult],
                measure: Callable[[dict], float | None] | None = None) -> dict:
    """One row of results.json: the set and, per system, totals and per-file scores; `measure` gives what
    one conversation of the set really holds (e.g. its SNR), averaged over the set."""
    speech, overlap = 0.0, 0.0
    for turns in test_set.references.values():
        union, overlapped = speech_activity(turns)
        speech += sum(end - start for start, end in union)
        overlap += overlapped
    systems = {}
    for name, result in results.items():
        exact, count_error = result.speaker_count(test_set.references)
        systems[name] = {
            "hypotheses": result.hypotheses,
            "processing_seconds": round(result.processing_seconds, 3),
            "real_time_factor": result.real_time_factor,
            "speaker_count_exact": exact,
            "speaker_count_abs_error": count_error,
            "false_alarm_per_minute": result.report.total.at(0.0).false_alarm / (seconds / 60) if seconds > 0 else 0.0,
            "mean_hypothesis_speakers": sum(result.hypothesis_speakers.get(uri, 0) for uri in test_set.references)
            / len(test_set.references),
            "label_consistency": result.label_consistency,
            "failed": result.failed,
            "same_as": result.same_as,
            "total": result.report.total.to_dict(),
            "files": [{
                "uri": row.uri,
                "der": row.at(0.0).der,
                "der_collar_0.25": row.at(0.25).der,
                "jer": row.jer,
                "speech_seconds": row.speech,
                "reference_speakers": count_speakers(test_set.references[row.uri]),
                "hypothesis_speakers": result.hypothesis_speakers.get(row.uri, 0),
            } for row in result.report.files],
        }
    reference_speakers = [count_speakers(turns) for turns in test_set.references.values()]
    measured = [value for value in map(measure, test_set.conversations) if value is not None] if measure else []
    return {
        "name": test_set.name,
        "fingerprint": test_set.fingerprint,
        "overrides": list(test_set.overrides),
        "files": len(test_set.recordings),
        "audio_seconds": round(seconds, 3),
        "speech_seconds": round(speech, 3),
        "overlap_ratio": overlap / speech if speech > 0 else 0.0,
        "mean_speakers": sum(reference_speakers) / len(reference_speakers),
        "measured": sum(measured) / len(measured) if measured else None,
        "note": test_set.note,
        "systems": systems,
    }


def run_groups(sets: list[tuple[dict, list[TestSet]]], systems: dict[str, System], out: Path,
               measures: dict[str, Callable[[dict], float | None]],
               earlier_runs: dict[str, dict[str, dict]]) -> list[dict]:
    """Run and score every system on every set (each distinct set once); the groups of results.json.

    `measures[group]`: what a conversation of that group's sets really holds (see `row_summary`);
    `earlier_runs[system][fingerprint]`: that system's earlier run on a set, used instead of running it.
    """
    first = next(test_set for _, test_sets in sets for test_set in test_sets)
    warm_up = TestSet(first.group, first.name, first.recordings[:1], {})
    for diarize_set in systems.values():
        with tqdm(total=1, desc="warm-up", leave=False, file=sys.stderr) as bar:
            diarize_set(warm_up, bar)
    groups = []
    done: dict[tuple[str, str], tuple[str, SystemResult]] = {}
    for description, test_sets in sets:
        rows = []
        for test_set in test_sets:
            seconds = audio_seconds(test_set.recordings)
            results = {}
            for name, diarize_set in systems.items():
                if (name, test_set.fingerprint) in done:
                    source, earlier = done[(name, test_set.fingerprint)]
                    results[name] = same_files_result(earlier, source, name, test_set, out)
                elif test_set.fingerprint in earlier_runs.get(name, {}):
                    entry = earlier_runs[name][test_set.fingerprint]
                    results[name] = earlier_run_result(entry, name, test_set, out, seconds)
                    done[(name, test_set.fingerprint)] = (test_set.key, results[name])
                else:
                    results[name] = run_system(name, diarize_set, test_set, out, seconds)
                    if test_set.fingerprint:
                        done[(name, test_set.fingerprint)] = (test_set.key, results[name])
            rows.append(row_summary(test_set, seconds, results, measures.get(test_set.group)))
        groups.append({**description, "plot": str(Path("plots") / f"{description['name']}.png"), "rows": rows})
    return groups
