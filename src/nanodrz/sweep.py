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

This module holds the study's design (axes, points, groups) and the command; `sweep_sets` makes the
sets, `sweep_runs` runs and scores the systems on them, `sweep_report` writes the report.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from nanodrz.bank import Bank
from nanodrz.checkpoint import weights_path
from nanodrz.commandline import add_pipeline_arguments, checked_changes, pipeline_changes
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import DEFAULT_COLLARS
from nanodrz.fileio import write_json
from nanodrz.params import DiarizationSettings
from nanodrz.paths import default_bank_dir
from nanodrz.pipeline import SHIPPED_MODEL, Diarizer
from nanodrz.simulate import check_bank
from nanodrz.sweep_report import write_report
from nanodrz.sweep_runs import System, baseline_system, earlier_baseline_runs, nanodrz_system, run_groups
from nanodrz.sweep_sets import PlannedSet, TestSet, annotated_set, materialize, plan_set

RESULTS_VERSION = 1
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
OURS = "nanodrz"
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
    add_pipeline_arguments(parser, skip=("--seed",))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


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


def files_per_point(args: argparse.Namespace) -> int:
    """--per-point, checked along with the other numbers of the command line."""
    per_point = args.per_point if args.per_point is not None else (QUICK_PER_POINT if args.quick else DEFAULT_PER_POINT)
    if per_point < 1:
        raise NanodrzError(f"--per-point {per_point}: must be at least 1")
    if args.seed < 0:
        raise NanodrzError(f"--seed {args.seed}: must be non-negative")
    if args.batch_size < 1:
        raise NanodrzError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise NanodrzError(f"--threads {args.threads}: must be at least 1")
    return per_point


def check_row_names(groups: list[tuple[dict, list[PlannedSet]]], extras: list[TestSet]) -> None:
    """The presets table names its rows by preset or folder; two of one name would share files."""
    names = [plan.name for description, plans in groups if description["kind"] == "sets" for plan in plans]
    names += [extra.name for extra in extras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise NanodrzError(f"two rows of the presets table are named {repeated[0]!r} (a preset and an --extra "
                           "folder, or two --extra folders with the same name)")


def systems_to_run(args: argparse.Namespace, baselines: list[str], diarizer: Diarizer
                   ) -> tuple[dict[str, System], dict[str, dict]]:
    """Ours first, then the baselines asked for (built only then: they load their own models), and each
    baseline's recipe (what decides its answers besides the audio)."""
    systems = {OURS: nanodrz_system(diarizer, args.batch_size, DiarizationSettings())}
    recipes = {}
    if baselines:
        from nanodrz import baseline

        classes = {"senko": baseline.SenkoBaseline, "pyannote": baseline.PyannoteBaseline}
        for name in baselines:
            instance = classes[name](device=args.device)
            systems[name], recipes[name] = baseline_system(instance), instance.recipe()
    return systems, recipes


def run(args: argparse.Namespace) -> int:
    per_point = files_per_point(args)
    changes = checked_changes(pipeline_changes(args))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NanodrzError(f"--out {out}: exists and is not a folder")
    groups = plan_groups(args, per_point)
    extras = [annotated_set(spec) for spec in args.extra]
    check_row_names(groups, extras)
    bank = None
    if any(plans for _, plans in groups):
        bank = Bank(args.bank if args.bank is not None else default_bank_dir(), args.split)
        for _, plans in groups:
            for plan in plans:
                check_bank(bank, plan.config)
    baselines = parse_list(args.baseline)
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise NanodrzError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
    if args.reuse_baseline and not baselines:
        raise NanodrzError("--reuse-baseline needs --baseline")
    model_path = args.model if args.model is not None else SHIPPED_MODEL
    diarizer = Diarizer.from_pretrained(args.model, args.device)
    diarizer.params = diarizer.params.with_values(changes)
    systems, recipes = systems_to_run(args, baselines, diarizer)
    earlier_runs = ({name: earlier_baseline_runs(out, name, recipes[name]) for name in baselines}
                    if args.reuse_baseline else {})
    sets = []
    for description, plans in groups:
        test_sets = [materialize(plan, out / "sets" / plan.group / plan.name, bank, args.seed) for plan in plans]
        sets.append((description, test_sets + (extras if description["kind"] == "sets" else [])))
    measures = {name: axis.measured[1] for name, axis in AXES.items() if axis.measured}
    results_groups = run_groups(sets, systems, out, measures, earlier_runs)
    results = {
        "version": RESULTS_VERSION,
        "model": str(model_path),
        "model_step": checkpoint_step(model_path),
        "device": args.device,
        "batch_size": args.batch_size,
        "pipeline": diarizer.params.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "systems": list(systems),
        "baseline_recipes": recipes,
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
