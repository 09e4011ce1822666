"""Difficulty study: DER along each axis of difficulty, for nanodrz and optionally senko; `nanodrz sweep`.

Every axis starts from one base conversation set (the `clean` preset with 2 speakers, 20 s, no
overlap, equal levels; see BASE_OVERRIDES) and changes one simulator knob, point by point, with
everything else fixed (AXES spells out which knob each point sets). All points share one seed, so
along the acoustic axes (noise, loudness, reverb) every point holds the same conversations with only
that knob changed, and the first point of every axis is the base set itself.

Sets are simulated from held-out speakers (split `test`) into DIR/sets/<axis>/<point>/ (audio,
reference RTTMs, manifest.json) and reused when their configuration, seed, size and bank have not
changed. `--preset` adds whole presets as rows of one table, `--extra` real annotated recordings.
The noise group (`--noise`; part of the default run) holds recordings of noise, music or tones with no
speech (scored as false-alarm seconds per minute), of one speaker (speaker count), and of near silence.
Each set is diarized by our `Diarizer` (and the baselines of `--baseline senko,pyannote`), hypotheses go to
DIR/hypotheses/<system>/<axis>/<point>.rttm, and `evaluate.score` scores them (collars 0 and
0.25 s, overlap scored). DIR/report.md holds one table and one plot per axis; DIR/results.json the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import soundfile as sf
import torch
from safetensors import safe_open
from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm, write_rttm
from nanodrz.audio import write_audio
from nanodrz.bank import Bank
from nanodrz.checkpoint import weights_path
from nanodrz.config import to_dict
from nanodrz.decoding import DecodingOptions
from nanodrz.diarize import (SHIPPED_MODEL, DiarizationSettings, Diarizer, add_resegment_arguments,
                             find_audio, merge_threshold_arg)
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import DEFAULT_COLLARS, EvaluationReport, label_consistency, load_turns, score
from nanodrz.fileio import atomic_open, atomic_path, write_json
from nanodrz.paths import default_bank_dir
from nanodrz.relabel import MERGE_THRESHOLD, REFINE_PASSES
from nanodrz.simulate import (SimulationConfig, as_range, check_bank, conversation_rng, load_preset,
                              simulate_conversation, speech_activity)

RESULTS_VERSION = 1
SET_VERSION = 1
BASE_PRESET = "clean"
# The base conversation: the easiest point of every axis below.
BASE_OVERRIDES = (
    "num_speakers=2",
    "duration=20",
    "turns.target_overlap_ratio=0.0",
    "loudness_gap_db=[0,0]",
    "noise.probability=0",
    "reverb.probability=0",
    "telephone.probability=0",
)
DEFAULT_PER_POINT = 20
QUICK_PER_POINT = 2
# Sets of longer conversations get fewer files, so that a point holds about per-point x 25 s of audio.
SECONDS_PER_FILE = 25.0
MIN_LONG_FORM_FILES = 2
OURS = "nanodrz"
CONSISTENCY_WINDOW = 30.0  # seconds; see `evaluate.label_consistency`
BASELINES = ("senko", "pyannote")  # `baseline.SenkoBaseline`, `baseline.PyannoteBaseline`


@dataclass(frozen=True)
class Point:
    """One value of an axis: a folder and row name, and the simulator overrides that set it."""

    name: str
    overrides: tuple[str, ...]
    quick: bool = False  # part of a `--quick` run


@dataclass(frozen=True)
class Axis:
    name: str
    title: str
    knob: str  # what the points change, for the report
    points: tuple[Point, ...]
    # What the sets really hold (column name, value from a conversation's manifest entry), where it can differ
    measured: tuple[str, Callable[[dict], float | None]] | None = None


def _measured_snr(meta: dict) -> float | None:
    values = [noise["measured_snr_db"] for noise in meta["noise"] if noise["measured_snr_db"] is not None]
    return sum(values) / len(values) if values else None


def _level_gap(meta: dict) -> float:
    gains = meta["speaker_gain_db"].values()
    return max(gains) - min(gains)


def _room_rt60(meta: dict) -> float | None:
    return meta["reverb"]["rt60"] if meta["reverb"] else None


def _snr_point(snr_db: int, quick: bool = False) -> Point:
    return Point(f"{snr_db}dB", ("noise.probability=1", "noise.sources=1", f"noise.snr_db=[{snr_db},{snr_db}]"), quick)


def _reverb_point(rt60: float, quick: bool = False) -> Point:
    # The room bank holds rooms spread over RT60 0.15-1.0 s; the closest room is used when none is within 50 ms.
    return Point(f"rt60-{rt60:g}s", ("reverb.probability=1", f"reverb.rt60=[{rt60 - 0.05:g},{rt60 + 0.05:g}]"), quick)


AXES = {axis.name: axis for axis in (
    Axis("overlap", "Overlap", "`turns.target_overlap_ratio`: the planner overlaps speaker changes to reach "
         "this share of overlapped speech", tuple(
             Point(f"{ratio:g}", (f"turns.target_overlap_ratio={ratio}",), ratio in (0.0, 0.4))
             for ratio in (0.0, 0.1, 0.2, 0.3, 0.4))),
    Axis("snr", "Background noise", "`noise.snr_db`: one noise (white, pink, brown, babble or music) at this "
         "SNR against the speech", (Point("clean", ("noise.probability=0",), True), _snr_point(20), _snr_point(10),
                                    _snr_point(5), _snr_point(0, True)), ("SNR dB over speech", _measured_snr)),
    Axis("speakers", "Number of speakers", "`num_speakers`", tuple(
        Point(str(count), (f"num_speakers={count}",), count in (2, 6)) for count in range(2, 7))),
    Axis("loudness", "Loudness gap", "`loudness_gap_db`: each speaker's level is drawn within half this many dB "
         "of the conversation's level, so two speakers are usually closer than the point says (level gap column: "
         "loudest minus quietest speaker)",
         tuple(Point(f"{gap}dB", (f"loudness_gap_db=[{gap},{gap}]",), gap in (0, 12)) for gap in (0, 6, 12)),
         ("level gap dB", _level_gap)),
    Axis("reverb", "Reverberation", "`reverb.rt60`: every speaker at its own place in one room of this RT60",
         (Point("none", ("reverb.probability=0",), True), _reverb_point(0.3), _reverb_point(0.6),
          _reverb_point(0.9, True)), ("room RT60 s", _room_rt60)),
    Axis("duration", "Duration (long form)", "`duration`: recording length in seconds (chunks and speaker prompts)",
         tuple(Point(f"{seconds}s", (f"duration={seconds}",), seconds in (20, 60)) for seconds in (20, 60, 180, 600))),
)}

# Recordings without speech (one non-speech sound under the whole base conversation's length, levels relative to
# its speech level of -30 to -20 dBFS), and the base conversation with one speaker.
NO_SPEECH = ("nonspeech.no_speech_probability=1", "nonspeech.sounds=1", "nonspeech.gap_probability=0")
NOISE_SETS = (
    Point("noise", (*NO_SPEECH, "nonspeech.types={noise: 1}", "nonspeech.level_db=[-10,0]")),
    Point("music", (*NO_SPEECH, "nonspeech.types={music: 1}", "nonspeech.level_db=[-10,0]")),
    Point("tones", (*NO_SPEECH, "nonspeech.types={tone: 1, square: 1}", "nonspeech.level_db=[-10,0]")),
    Point("one-speaker", ("num_speakers=1",)),
    Point("silence", (*NO_SPEECH, "nonspeech.types={room: 1}", "nonspeech.level_db=[-30,-25]")),
)
NOISE_GROUP = {"name": "noise", "title": "Non-speech and one speaker", "kind": "noise",
               "knob": "white, pink or brown noise, music on hold, or steady tones and square waves at -40 to -20 "
                       "dBFS with no speech at all; the base conversation with one speaker; room tone at -60 to "
                       "-45 dBFS (near silence). FA s/min: seconds of speech written per minute of audio where "
                       "nobody speaks"}


# --------------------------------------------------------------------------------------------------
# Test sets


@dataclass
class TestSet:
    """Recordings with reference turns: one row of a table."""

    group: str
    name: str
    recordings: list[tuple[str, Path]]  # (file id, audio path)
    references: dict[str, list[Turn]]
    overrides: tuple[str, ...] = ()
    fingerprint: str | None = None  # simulated sets with equal fingerprints hold the same files
    note: str = ""
    conversations: list[dict] = field(default_factory=list)  # simulator records (manifest entries)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class PlannedSet:
    """A simulated set still to be written or found on disk."""

    group: str
    name: str
    preset: str
    overrides: tuple[str, ...]  # all of them, as given to `load_preset`
    point_overrides: tuple[str, ...]  # those that make this point of an axis
    config: SimulationConfig
    count: int


def plan_set(group: str, name: str, preset: str, overrides: tuple[str, ...], point_overrides: tuple[str, ...],
             per_point: int) -> PlannedSet:
    config = load_preset(preset, list(overrides))
    return PlannedSet(group, name, preset, overrides, point_overrides, config, file_count(config, per_point))


def file_count(config: SimulationConfig, per_point: int) -> int:
    """`per_point`, or fewer files for long recordings so a set holds about per_point x 25 s of audio."""
    mean_seconds = sum(as_range(config.duration)) / 2
    if mean_seconds <= SECONDS_PER_FILE:
        return per_point
    return min(per_point, max(MIN_LONG_FORM_FILES, math.ceil(per_point * SECONDS_PER_FILE / mean_seconds)))


def set_fingerprint(plan: PlannedSet, bank: Bank, seed: int) -> str:
    """What decides a simulated set's bytes: configuration, seed, size, bank folder, split and speakers."""
    identity = {
        "version": SET_VERSION,
        "config": to_dict(plan.config),
        "seed": seed,
        "count": plan.count,
        "bank": str(bank.root.resolve()),
        "splits": list(bank.splits),
        "speakers": [speaker.speaker for speaker in bank.speakers],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def materialize(plan: PlannedSet, directory: Path, bank: Bank, seed: int) -> TestSet:
    """Write the set's audio, RTTMs and manifest (manifest last), or reuse them if already there."""
    fingerprint = set_fingerprint(plan, bank, seed)
    manifest_path = directory / "manifest.json"
    names = [f"{index:05d}" for index in range(plan.count)]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    entries = manifest.get("conversations", [])
    reusable = manifest.get("fingerprint") == fingerprint and all(
        (directory / f"{name}.{ext}").is_file() for name in names for ext in ("wav", "rttm"))
    if not reusable:
        for stale in [*directory.glob("*.wav"), *directory.glob("*.rttm")]:
            if stale.stem not in names:
                stale.unlink()
        entries = []
        for index, name in enumerate(tqdm(names, desc=f"simulating {plan.group}/{plan.name}", unit="file",
                                          leave=False, file=sys.stderr)):
            conversation = simulate_conversation(bank, plan.config, conversation_rng(seed, index))
            write_audio(directory / f"{name}.wav", conversation.audio, conversation.sample_rate)
            write_rttm(directory / f"{name}.rttm", {name: conversation.turns})
            entries.append({"id": name, "audio": f"{name}.wav", "rttm": f"{name}.rttm", **conversation.meta})
        write_json(manifest_path, {
            "version": SET_VERSION,
            "fingerprint": fingerprint,
            "preset": plan.preset,
            "overrides": list(plan.overrides),
            "config": to_dict(plan.config),
            "seed": seed,
            "split": ",".join(bank.splits),
            "bank": str(bank.root),
            "conversations": entries,
        })
    references = {}
    for name in names:
        references[name] = read_rttm(directory / f"{name}.rttm").get(name, [])
    return TestSet(plan.group, plan.name, [(name, directory / f"{name}.wav") for name in names], references,
                   plan.point_overrides, fingerprint, conversations=entries)


def annotated_set(spec: str) -> TestSet:
    """`AUDIO_DIR[:RTTM_DIR]`: the audio files of a folder whose stems have reference turns in RTTM_DIR."""
    audio_part, _, rttm_part = spec.partition(":")
    audio_dir = Path(audio_part)
    rttm_dir = Path(rttm_part) if rttm_part else audio_dir
    if not audio_dir.is_dir():
        raise NanodrzError(f"--extra {spec}: {audio_dir} is not a folder")
    references = load_turns(rttm_dir, "reference")
    files, _ = find_audio([str(audio_dir)])
    recordings = [(path.stem, path) for _, path in files if path.stem in references]
    if not recordings:
        raise NanodrzError(f"--extra {spec}: no audio file in {audio_dir} has a reference in {rttm_dir} "
                           "(file stems must match RTTM file ids)")
    skipped = len(files) - len(recordings)
    note = f"{skipped} audio file(s) without reference skipped" if skipped else ""
    return TestSet("sets", audio_dir.resolve().name, recordings, {uri: references[uri] for uri, _ in recordings},
                   note=note)


# --------------------------------------------------------------------------------------------------
# Running and scoring one system on one set


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
        errors = [abs(self.hypothesis_speakers.get(uri, 0) - len({t.speaker for t in turns}))
                  for uri, turns in references.items()]
        return sum(error == 0 for error in errors) / len(errors), sum(errors) / len(errors)


def audio_seconds(recordings: Sequence[tuple[str, Path]]) -> float:
    return sum(sf.info(str(path)).duration for _, path in recordings)


def hypotheses_path(system: str, test_set: TestSet) -> Path:
    return Path("hypotheses") / system / test_set.group / f"{test_set.name}.rttm"


def run_system(name: str, diarize_set: Callable[[TestSet, tqdm], tuple[dict[str, list[Turn]], list[str]]],
               test_set: TestSet, out: Path, seconds: float) -> SystemResult:
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
    speakers = {uri: len({t.speaker for t in turns}) for uri, turns in hypotheses.items()}
    long_files = [uri for uri, turns in test_set.references.items()
                  if turns and max(t.end for t in turns) > CONSISTENCY_WINDOW]
    pieces = [label_consistency(test_set.references[uri], hypotheses.get(uri, []), CONSISTENCY_WINDOW)
              for uri in long_files]
    consistency = (sum(c for c, _ in pieces), sum(n for _, n in pieces))
    return SystemResult(report, elapsed, seconds, speakers, failed, str(relative), consistency)


def earlier_baseline_runs(out: Path, system: str) -> dict[str, dict]:
    """{set fingerprint: that set's row entry for `system`} from an earlier sweep in `out` (its
    results.json), for the simulated sets whose hypotheses file is still there."""
    path = out / "results.json"
    if not path.is_file():
        raise NanodrzError(f"--reuse-baseline: no earlier results.json in {out}")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise NanodrzError(f"--reuse-baseline: {path} is unreadable ({error})") from None
    runs = {}
    for group in earlier.get("groups", []):
        for row in group.get("rows", []):
            entry = row.get("systems", {}).get(system)
            if row.get("fingerprint") and entry and not entry.get("failed") and (out / entry["hypotheses"]).is_file():
                runs[row["fingerprint"]] = entry
    return runs


def reused_baseline(entry: dict, name: str, test_set: TestSet, out: Path, seconds: float) -> SystemResult:
    """A baseline's earlier run on the very same files: its hypotheses, rescored, and its timing."""
    relative = hypotheses_path(name, test_set)
    if out / relative != out / entry["hypotheses"]:
        with atomic_path(out / relative) as tmp:
            shutil.copyfile(out / entry["hypotheses"], tmp)
    return scored_result(relative, [uri for uri, _ in test_set.recordings], test_set, out,
                         entry["processing_seconds"], seconds, [])


def reuse(earlier: SystemResult, source: str, name: str, test_set: TestSet, out: Path) -> SystemResult:
    """The result of a set with the same files (e.g. the base set at the start of every axis), under this row."""
    relative = hypotheses_path(name, test_set)
    with atomic_path(out / relative) as tmp:
        shutil.copyfile(out / earlier.hypotheses, tmp)
    return dataclasses.replace(earlier, hypotheses=str(relative), same_as=source)


def nanodrz_runner(diarizer: Diarizer, batch_size: int, settings: DiarizationSettings):
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


def baseline_runner(baseline):
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


# --------------------------------------------------------------------------------------------------
# Results, plots and the report


def row_summary(test_set: TestSet, seconds: float, results: dict[str, SystemResult],
                measure: Callable[[dict], float | None] | None = None) -> dict:
    """One row of results.json: the set and, per system, totals and per-file scores."""
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
                "reference_speakers": len({t.speaker for t in test_set.references[row.uri]}),
                "hypothesis_speakers": result.hypothesis_speakers.get(row.uri, 0),
            } for row in result.report.files],
        }
    reference_speakers = [len({t.speaker for t in turns}) for turns in test_set.references.values()]
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


def percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(rows: list[dict], systems: list[str], first_column: str, measured: str | None) -> str:
    header = [first_column, "files", "audio min", "speech s", "overlap %", "speakers", *([measured] if measured else []),
              "DER %", "miss %", "FA %", "conf %", "DER % c0.25", "JER %", "#spk exact %", "label cons. %", "RTF"]
    for baseline in systems[1:]:
        header += [f"{baseline} DER %", f"{baseline} DER % c0.25", f"{baseline} #spk exact %",
                   f"{baseline} label cons. %", f"{baseline} RTF"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        ours = row["systems"][OURS]
        der0, der25 = ours["total"]["der"]
        cells = [row["name"], str(row["files"]), f"{row['audio_seconds'] / 60:.1f}", f"{row['speech_seconds']:.0f}",
                 percent(row["overlap_ratio"]), f"{row['mean_speakers']:.1f}",
                 *(["–" if row["measured"] is None else f"{row['measured']:.2f}"] if measured else []),
                 percent(der0["der"]), percent(der0["missed"]), percent(der0["false_alarm"]),
                 percent(der0["confusion"]), percent(der25["der"]), percent(ours["total"]["jer"]),
                 percent(ours["speaker_count_exact"]), percent(ours["label_consistency"]),
                 f"{ours['real_time_factor']:.3f}"]
        for baseline in systems[1:]:
            other = row["systems"][baseline]
            cells += [percent(other["total"]["der"][0]["der"]), percent(other["total"]["der"][1]["der"]),
                      percent(other["speaker_count_exact"]), percent(other["label_consistency"]),
                      f"{other['real_time_factor']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(rows: list[dict], systems: list[str]) -> str:
    """Rows of the noise group: false-alarm seconds per minute, speaker counts, DER where there is speech."""
    header = ["set", "files", "audio min", "speech s", "speakers"]
    for system in systems:
        prefix = "" if system == OURS else f"{system} "
        header += [f"{prefix}FA s/min", f"{prefix}DER %", f"{prefix}#spk exact %", f"{prefix}mean #spk", f"{prefix}RTF"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row["name"], str(row["files"]), f"{row['audio_seconds'] / 60:.1f}", f"{row['speech_seconds']:.0f}",
                 f"{row['mean_speakers']:.1f}"]
        for system in systems:
            result = row["systems"][system]
            cells += [f"{result['false_alarm_per_minute']:.1f}",
                      percent(result["total"]["der"][0]["der"] if row["speech_seconds"] > 0 else None),
                      percent(result["speaker_count_exact"]), f"{result['mean_hypothesis_speakers']:.1f}",
                      f"{result['real_time_factor']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_group(group: dict, systems: list[str], path: Path) -> None:
    """DER (collar 0 solid, 0.25 dashed) of every system against the axis points (or per set, as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = group["rows"]
    labels = [row["name"] for row in rows]
    fig, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2) + 2.0, 3.6))
    palette = plt.get_cmap("tab10")
    for index, system in enumerate(systems):
        der0 = [100 * row["systems"][system]["total"]["der"][0]["der"] for row in rows]
        der25 = [100 * row["systems"][system]["total"]["der"][1]["der"] for row in rows]
        if group["kind"] == "noise":
            der0 = [row["systems"][system]["false_alarm_per_minute"] for row in rows]
        if group["kind"] == "axis":
            axis.plot(labels, der0, "o-", color=palette(index), label=f"{system} (collar 0)")
            axis.plot(labels, der25, "o--", color=palette(index), alpha=0.6, label=f"{system} (collar 0.25 s)")
        else:
            width = 0.8 / len(systems)
            positions = [i + (index - (len(systems) - 1) / 2) * width for i in range(len(rows))]
            axis.bar(positions, der0, width, color=palette(index), label=f"{system} (collar 0)")
            axis.set_xticks(range(len(rows)), labels)
    axis.set_xlabel(group["title"])
    axis.set_ylabel("false alarm s/min" if group["kind"] == "noise" else "DER %")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.set_title(f"{'False alarm' if group['kind'] == 'noise' else 'DER'}: {group['title'].lower()}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out: Path, results: dict) -> None:
    systems = results["systems"]
    lines = [
        "# nanodrz sweep",
        "",
        f"- model: `{results['model']}` (step {results['model_step']}), device {results['device']}, "
        f"batch size {results['batch_size']}, {results['torch_threads']} torch threads, label-merging threshold "
        f"{results.get('merge_threshold', 'none')}, EOS penalty {results.get('eos_penalty', 0)}, voice re-labelling "
        f"passes {results.get('refine_passes', 0)}, speech / overlap thresholds "
        f"{results.get('speech_threshold', 'off')} / {results.get('overlap_threshold', 'off')}",
        f"- systems: {', '.join(systems)}",
        f"- simulated sets: bank `{results['bank']}`, split `{results['split']}`, seed {results['seed']}, "
        f"{results['per_point']} files per point (fewer for long recordings: about {results['per_point']} x "
        f"{SECONDS_PER_FILE:g} s of audio, at least {MIN_LONG_FORM_FILES} files)"
        + (", quick run (first and last points; 20 and 60 s for duration)" if results["quick"] else ""),
        f"- base conversation: preset `{BASE_PRESET}` with " + ", ".join(f"`{o}`" for o in results["base_overrides"])
        + "; every axis changes one knob of it, and all points share the seed",
        "- DER = (missed + false alarm + confusion) / reference speech, accumulated over the files of a row; "
        "collar 0 unless marked c0.25 (0.25 s unscored each side of reference boundaries); overlapped speech "
        "scored; JER without collar. #spk exact: files with exactly the reference number of speakers. "
        f"label cons.: over files longer than {CONSISTENCY_WINDOW:g} s, the share of hypothesis speech whose label "
        f"maps to the same reference speaker in its {CONSISTENCY_WINDOW:g} s piece as over the whole file. "
        "RTF: processing seconds / audio seconds (model loading excluded, after one untimed warm-up file).",
    ]
    for group in results["groups"]:
        lines += ["", f"## {group['title']}", ""]
        if group.get("knob"):
            lines += [f"Knob: {group['knob']}.", ""]
        lines.append(noise_table(group["rows"], systems) if group["kind"] == "noise" else
                     markdown_table(group["rows"], systems, "point" if group["kind"] == "axis" else "set",
                                    group.get("measured")))
        notes = [f"{row['name']}: {row['note']}" for row in group["rows"] if row["note"]]
        notes += [f"{row['name']}: the same files as {row['systems'][OURS]['same_as']}, scores reused"
                  for row in group["rows"] if row["systems"][OURS]["same_as"]]
        notes += [f"{row['name']}: {system} failed on {len(row['systems'][system]['failed'])} file(s), scored as "
                  f"all missed" for row in group["rows"] for system in systems if row["systems"][system]["failed"]]
        if notes:
            lines += ["", *[f"- {note}" for note in notes]]
        lines += ["", f"![DER: {group['title']}]({group['plot']})"]
    with atomic_open(out / "report.md") as handle:
        handle.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint .safetensors (default: the shipped model)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: sets/, hypotheses/, report.md, ...")
    parser.add_argument("--bank", type=Path, help="speech bank folder (default: <cache>/bank)")
    parser.add_argument("--split", default="test", help="bank split the speakers come from (default: test)")
    parser.add_argument("--axes", help=f"comma-separated axes: {','.join(AXES)} (default: all, unless "
                                       "--preset or --extra is given)")
    parser.add_argument("--preset", help="comma-separated presets scored as rows of one table, e.g. "
                                         "clean,overlap,noisy,crowd,phone")
    parser.add_argument("--extra", action="append", default=[], metavar="AUDIO_DIR[:RTTM_DIR]",
                        help="an annotated set (audio stems = RTTM file ids) added as a row (repeatable)")
    parser.add_argument("--noise", action="store_true",
                        help="also run the noise group: noise-, music- and tone-only recordings, one speaker, "
                             "near silence (part of the default run)")
    parser.add_argument("--per-point", type=int, help=f"files per point (default: {DEFAULT_PER_POINT}, "
                                                      f"--quick: {QUICK_PER_POINT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated sets (default: 0)")
    parser.add_argument("--baseline", metavar="NAMES", help=f"also run these systems on the same files, comma-separated: "
                                                          f"{', '.join(BASELINES)} (pyannote: our re-implementation of "
                                                          "pyannote 3.1 on segmentation-3.0 and CAM++)")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="take the baseline's hypotheses and timings from the earlier sweep in --out for "
                             "simulated sets whose files are unchanged (the baseline does not depend on our model)")
    parser.add_argument("--quick", action="store_true", help="first and last point of each axis only (duration: "
                                                             "20 and 60 s), fewer files")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="recordings decoded together (default: 8)")
    parser.add_argument("--merge-threshold", type=merge_threshold_arg, default=MERGE_THRESHOLD, metavar="COSINE",
                        help=f"nanodrz diarize's label-merging threshold (default: {MERGE_THRESHOLD:g})")
    parser.add_argument("--eos-penalty", type=float, default=DecodingOptions.eos_penalty, metavar="NATS",
                        help=f"nanodrz diarize's EOS penalty (default: {DecodingOptions.eos_penalty:g})")
    parser.add_argument("--refine-passes", type=int, default=REFINE_PASSES, metavar="N",
                        help=f"nanodrz diarize's voice re-labelling passes (default: {REFINE_PASSES}; 0 = off)")
    add_resegment_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def evaluate_groups(sets: list[tuple[dict, list[TestSet]]], systems: dict[str, Callable], out: Path,
                    earlier_runs: dict[str, dict[str, dict]] | None = None) -> list[dict]:
    """Run and score every system on every set (each distinct set once), plot each group; the results rows.

    `earlier_runs[system][fingerprint]`: that system's earlier run on a set, used instead of running it.
    """
    earlier_runs = earlier_runs or {}
    first = next(test_set for _, test_sets in sets for test_set in test_sets)
    warm_up = TestSet(first.group, first.name, first.recordings[:1], {})
    for diarize_set in systems.values():
        with tqdm(total=1, desc="warm-up", leave=False, file=sys.stderr) as bar:
            diarize_set(warm_up, bar)
    groups = []
    measures = {name: axis.measured[1] for name, axis in AXES.items() if axis.measured}
    done: dict[tuple[str, str], tuple[str, SystemResult]] = {}
    for description, test_sets in sets:
        rows = []
        for test_set in test_sets:
            seconds = audio_seconds(test_set.recordings)
            results = {}
            for name, diarize_set in systems.items():
                if (name, test_set.fingerprint) in done:
                    source, earlier = done[(name, test_set.fingerprint)]
                    results[name] = reuse(earlier, source, name, test_set, out)
                elif test_set.fingerprint in earlier_runs.get(name, {}):
                    entry = earlier_runs[name][test_set.fingerprint]
                    results[name] = reused_baseline(entry, name, test_set, out, seconds)
                    done[(name, test_set.fingerprint)] = (test_set.key, results[name])
                else:
                    results[name] = run_system(name, diarize_set, test_set, out, seconds)
                    if test_set.fingerprint:
                        done[(name, test_set.fingerprint)] = (test_set.key, results[name])
            rows.append(row_summary(test_set, seconds, results, measures.get(test_set.group)))
        plot = Path("plots") / f"{description['name']}.png"
        group = {**description, "plot": str(plot), "rows": rows}
        plot_group(group, list(systems), out / plot)
        groups.append(group)
    return groups


def parse_list(value: str | None) -> list[str]:
    return list(dict.fromkeys(item.strip() for item in (value or "").split(",") if item.strip()))


def plan_groups(args: argparse.Namespace, per_point: int) -> list[tuple[dict, list[PlannedSet]]]:
    """The axes and presets asked for, each as (group description, its simulated sets)."""
    axes = parse_list(args.axes)
    if args.axes is not None and not axes:
        raise NanodrzError("--axes is empty")
    everything = args.axes is None and not args.preset and not args.extra and not args.noise
    if everything:
        axes = list(AXES)
    unknown = [name for name in axes if name not in AXES]
    if unknown:
        raise NanodrzError(f"unknown axis {unknown[0]!r} (choose from {', '.join(AXES)})")
    groups = []
    for name in axes:
        axis = AXES[name]
        points = [point for point in axis.points if point.quick or not args.quick]
        plans = [plan_set(name, point.name, BASE_PRESET, (*BASE_OVERRIDES, *point.overrides), point.overrides,
                          per_point) for point in points]
        groups.append(({"name": name, "title": axis.title, "knob": axis.knob, "kind": "axis",
                        "measured": axis.measured[0] if axis.measured else None}, plans))
    if args.noise or everything:
        groups.append((NOISE_GROUP, [plan_set("noise", point.name, BASE_PRESET, (*BASE_OVERRIDES, *point.overrides),
                                              point.overrides, per_point) for point in NOISE_SETS]))
    presets = parse_list(args.preset)
    if presets or args.extra:
        plans = [plan_set("sets", Path(preset).stem, preset, (), (), per_point) for preset in presets]
        groups.append(({"name": "sets", "title": "Presets and annotated sets", "kind": "sets",
                        "knob": "none; each preset as it is (its own ranges of every knob), with the same seed"},
                       plans))
    return groups


def checkpoint_step(path: Path) -> int:
    with safe_open(str(weights_path(path)), framework="pt") as handle:
        return int((handle.metadata() or {}).get("step", -1))


def run(args: argparse.Namespace) -> int:
    per_point = args.per_point if args.per_point is not None else (QUICK_PER_POINT if args.quick else DEFAULT_PER_POINT)
    if per_point < 1:
        raise NanodrzError(f"--per-point {per_point}: must be at least 1")
    if args.seed < 0:
        raise NanodrzError(f"--seed {args.seed}: must be non-negative")
    if args.batch_size < 1:
        raise NanodrzError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise NanodrzError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NanodrzError(f"--out {out}: exists and is not a folder")
    groups = plan_groups(args, per_point)
    extras = [annotated_set(spec) for spec in args.extra]
    names = [plan.name for description, plans in groups if description["kind"] == "sets" for plan in plans]
    names += [extra.name for extra in extras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise NanodrzError(f"two rows of the presets table are named {repeated[0]!r} (a preset and an --extra "
                           "folder, or two --extra folders with the same name)")
    bank = None
    if any(plans for _, plans in groups):
        bank = Bank(args.bank if args.bank is not None else default_bank_dir(), args.split)
        for _, plans in groups:
            for plan in plans:
                check_bank(bank, plan.config)
    earlier_runs = {}
    baselines = parse_list(args.baseline)
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise NanodrzError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
    if args.reuse_baseline:
        if not baselines:
            raise NanodrzError("--reuse-baseline needs --baseline")
        earlier_runs = {name: earlier_baseline_runs(out, name) for name in baselines}
    model_path = args.model if args.model is not None else SHIPPED_MODEL
    settings = DiarizationSettings(merge_threshold=args.merge_threshold, refine_passes=args.refine_passes,
                                   speech_threshold=args.speech_threshold, overlap_threshold=args.overlap_threshold,
                                   nonspeech_threshold=args.nonspeech_threshold,
                                   decoding=DecodingOptions(eos_penalty=args.eos_penalty))
    systems = {OURS: nanodrz_runner(Diarizer.from_pretrained(args.model, args.device), args.batch_size, settings)}
    if baselines:
        from nanodrz import baseline

        classes = {"senko": baseline.SenkoBaseline, "pyannote": baseline.PyannoteBaseline}
        for name in baselines:
            systems[name] = baseline_runner(classes[name](device=args.device))
    sets = []
    for description, plans in groups:
        test_sets = [materialize(plan, out / "sets" / plan.group / plan.name, bank, args.seed) for plan in plans]
        sets.append((description, test_sets + (extras if description["kind"] == "sets" else [])))
    results_groups = evaluate_groups(sets, systems, out, earlier_runs)
    results = {
        "version": RESULTS_VERSION,
        "model": str(model_path),
        "model_step": checkpoint_step(model_path),
        "device": args.device,
        "batch_size": args.batch_size,
        "merge_threshold": args.merge_threshold if args.merge_threshold != float("inf") else "off",
        "eos_penalty": args.eos_penalty,
        "refine_passes": args.refine_passes,
        "speech_threshold": "off" if args.speech_threshold is None else args.speech_threshold,
        "overlap_threshold": "off" if args.overlap_threshold is None else args.overlap_threshold,
        "nonspeech_threshold": "off" if args.nonspeech_threshold is None else args.nonspeech_threshold,
        "torch_threads": torch.get_num_threads(),
        "systems": list(systems),
        "bank": str(bank.root) if bank is not None else None,
        "split": args.split,
        "seed": args.seed,
        "per_point": per_point,
        "quick": args.quick,
        "base_preset": BASE_PRESET,
        "base_overrides": list(BASE_OVERRIDES),
        "collars": list(DEFAULT_COLLARS),
        "groups": results_groups,
    }
    write_json(out / "results.json", results)
    write_report(out, results)
    print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return 0
