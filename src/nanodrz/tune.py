"""`nanodrz tune`: choose the pipeline's post-processing parameters on validation-speaker sets with Optuna.

Each recording of the sets is decoded once (`Diarizer.chunk_outputs_many`: front ends, decoding, long-form
stitching); every trial then replays only the cheap rules (`ChunkOutputs.finish`) under the parameters
Optuna's TPE sampler proposes within the ranges `params.py` declares, and scores what users would get:

- sets with speech: DER % (collar 0, overlap scored); the objective is their mean;
- sets where nobody speaks (a name in `--quiet-sets`): seconds of speech written per minute. A trial that
  writes more than `--max-false-alarm` on any of them is infeasible (Optuna's constraints), and the
  chosen parameters are the best feasible trial's (the best of all when none is feasible, said so).

The model's current parameters are the first trial, so the result reproduces or beats them. Writes
`params.yaml` (the chosen parameters: `nanodrz diarize --params`, or into the model with `--store`),
`study.md` (current against chosen per set; each rule switched off alone from the chosen parameters, so
every rule that stays shows its gain; the best trials) and `trials.csv`. A rule whose absence costs nothing
on validation (no higher mean DER, and no more speech written on any quiet set) is retired: switched off
in the chosen parameters, so the pipeline keeps only the rules the model needs. Sets are folders of WAV
files with RTTM references beside them, as `nanodrz simulate` writes them (`benchmarks/validation_sets.sh`);
they must hold validation speakers only, never test speakers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import yaml
from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm
from nanodrz.checkpoint import store_pipeline
from nanodrz.commandline import (add_model_arguments, add_pipeline_arguments, check_run_arguments, checked_changes,
                                 encoder_thread_count, pipeline_changes)
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import score
from nanodrz.fileio import atomic_open, check_writable_folder
from nanodrz.params import DiarizationSettings, PipelineParams, search_space
from nanodrz.pipeline import SHIPPED_MODEL, Diarizer
from nanodrz.postprocess import ChunkOutputs
from nanodrz.postprocess.resegment import FrameCounts
from nanodrz.postprocess.voices import Voices, written_seconds

# Each rule of `postprocess`, switched off: the ablation rows of the study report.
RULES_OFF = {
    "voice merging": {"merge.threshold": None},
    "voice re-labelling": {"refine.passes": 0},
    "dominant-label split": {"split.two_voice_cosine": None, "split.same_voice_cosine": None},
    "small-label absorption": {"absorb.min_label_seconds": 0.0},
    "resegmentation (overlap head)": {"resegment.speech_threshold": None, "resegment.overlap_threshold": None},
    "segmentation-3.0 gate": {"resegment.nonspeech_threshold": None},
    "short-island removal": {"resegment.min_island_seconds": 0.0},
}


@dataclass(frozen=True)
class Recording:
    name: str
    reference: list[Turn]
    outputs: ChunkOutputs
    seconds: float


@dataclass(frozen=True)
class Scores:
    """One parameter set's results: per set, DER % (speech sets) or speech seconds per minute (quiet
    sets), and for one-speaker sets (`mono-*`) the % of recordings given exactly one speaker."""

    per_set: dict[str, float]
    one_speaker: dict[str, float]
    mean_der: float
    worst_false_alarm: float


def read_sets(folder: Path) -> list[Path]:
    sets = sorted(path for path in folder.iterdir() if path.is_dir() and any(path.glob("*.wav"))) \
        if folder.is_dir() else []
    if not sets:
        raise NanodrzError(f"{folder}: no set folders with WAV files (make them with benchmarks/validation_sets.sh)")
    for path in sets:
        missing = [wav.name for wav in path.glob("*.wav") if not wav.with_suffix(".rttm").is_file()]
        if missing:
            raise NanodrzError(f"{path}: {missing[0]} has no RTTM reference beside it")
    return sets


def decode_sets(diarizer: Diarizer, sets: list[Path], batch_size: int, cache: Path | None
                ) -> dict[str, list[Recording]]:
    """The expensive stage, once per recording of every set; with `cache`, kept there (one `.npz` per
    recording, named by a hash of its audio file, under a key of the model file and the parameters of
    that stage) and read back on the next run instead of decoding again. A set simulated again under
    the same name is decoded again."""
    folder_key = None
    if cache is not None:
        folder_key = cache / expensive_stage_key(diarizer)
        folder_key.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[Recording]] = {}
    for folder in tqdm(sets, desc="decode", unit="set", file=sys.stderr):
        wavs = sorted(folder.glob("*.wav"))
        cached = ({wav: folder_key / folder.name / f"{wav.stem}-{file_digest(wav)}.npz" for wav in wavs}
                  if folder_key else {})
        todo = [wav for wav in wavs if not (wav in cached and cached[wav].is_file())]
        decoded = dict(zip(todo, (outputs for _, outputs in diarizer.chunk_outputs_many(
            [(wav.stem, str(wav)) for wav in todo], batch_size=batch_size))))
        for wav in wavs:
            outputs = decoded[wav] if wav in decoded else load_chunk_outputs(cached[wav])
            if isinstance(outputs, NanodrzError):
                raise outputs
            if wav in decoded and wav in cached:
                save_chunk_outputs(cached[wav], outputs)
            # An RTTM without SPEAKER lines is a recording where nobody speaks.
            reference = next(iter(read_rttm(wav.with_suffix(".rttm")).values()), [])
            found.setdefault(folder.name, []).append(Recording(wav.stem, reference, outputs,
                                                               sf.info(str(wav)).duration))
    return found


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def expensive_stage_key(diarizer: Diarizer) -> str:
    """What the expensive stage's outputs depend on: the model's weights file, the decoding and
    long-form parameters and whether the gate's counts were computed (post-processing replays on top)."""
    values = diarizer.params.to_dict()
    key = {"decoding": values["decoding"], "long_form": values["long_form"], "model": weights_digest(diarizer.model)}
    if not getattr(getattr(diarizer.model, "front_end", None), "bf16", True):
        key["float32_encoders"] = True  # named only when set, so caches of the default stay valid
    if not values["long_form"]["encode_once"]:
        key["chunk_features"] = "model input"  # the voice track and gate read the model input's pass
    if diarizer.params.resegment.nonspeech_threshold is None:
        key["without_segmentation"] = True  # the gate's segmentation-3.0 counts were not computed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every weight: two checkpoints decode alike exactly when it agrees."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_chunk_outputs(path: Path, outputs: ChunkOutputs) -> None:
    """`outputs` as an `.npz` of arrays and one JSON string (no pickle: a cache can be shared)."""
    arrays = {"scores": np.asarray(outputs.scores, dtype=np.float64)}
    for name, counts in (("counts", outputs.counts), ("segmentation", outputs.segmentation)):
        if counts is not None:
            arrays[name] = counts.probabilities
    if outputs.voices is not None:
        arrays["voices"] = outputs.voices.frames
    meta = {"turns": [[t.start, t.end, t.speaker] for t in outputs.turns], "named": sorted(outputs.named),
            "time_resolution": outputs.time_resolution, "loudest_dbfs": outputs.loudest_dbfs,
            "counts_rate": outputs.counts.frame_rate if outputs.counts else None,
            "segmentation_rate": outputs.segmentation.frame_rate if outputs.segmentation else None,
            "voices": [outputs.voices.frame_rate, outputs.voices.window_seconds] if outputs.voices else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)


def load_chunk_outputs(path: Path) -> ChunkOutputs:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        counts = FrameCounts(data["counts"], meta["counts_rate"]) if meta["counts_rate"] else None
        segmentation = FrameCounts(data["segmentation"], meta["segmentation_rate"]) \
            if meta["segmentation_rate"] else None
        voices = Voices(data["voices"], *meta["voices"]) if meta["voices"] else None
        return ChunkOutputs(tuple(Turn(*turn) for turn in meta["turns"]), tuple(data["scores"].tolist()), voices,
                            counts, segmentation, frozenset(meta["named"]), meta["time_resolution"],
                            meta["loudest_dbfs"])


def evaluate(found: dict[str, list[Recording]], params: PipelineParams, quiet_sets: set[str]) -> Scores:
    settings = DiarizationSettings()
    per_set, one_speaker = {}, {}
    for set_name, recordings in sorted(found.items()):
        hypotheses = {r.name: r.outputs.finish(params, settings)[0] for r in recordings}
        if set_name in quiet_sets:
            minutes = sum(r.seconds for r in recordings) / 60
            per_set[set_name] = sum(written_seconds(h) for h in hypotheses.values()) / minutes
            continue
        references = {r.name: r.reference for r in recordings}
        per_set[set_name] = 100 * score(references, hypotheses, collars=(0.0,)).total.at(0.0).der
        if set_name.startswith("mono-"):
            one_speaker[set_name] = 100 * float(np.mean([len({t.speaker for t in h}) == 1 for h in hypotheses.values()]))
    speech = [value for name, value in per_set.items() if name not in quiet_sets]
    quiet = [value for name, value in per_set.items() if name in quiet_sets]
    return Scores(per_set, one_speaker, float(np.mean(speech)) if speech else math.nan, max(quiet, default=0.0))


def suggest(trial, space: dict, base: PipelineParams) -> PipelineParams:
    """Parameters for one Optuna trial: each searched parameter drawn from its declared range."""
    changes: dict[str, Any] = {}
    for key, (search, kind) in space.items():
        if search.off and trial.suggest_categorical(f"{key}:on", [True, False]) is False:
            changes[key] = None
        elif kind is int:
            changes[key] = trial.suggest_int(key, int(search.low), int(search.high))
        else:
            changes[key] = trial.suggest_float(key, search.low, search.high)
    return base.with_values(changes)


def trial_values(params: PipelineParams, space: dict) -> dict[str, Any]:
    """Optuna's view of `params` (to enqueue the current parameters as the first trial)."""
    values = {}
    for key, (search, _) in space.items():
        group, name = key.split(".")
        value = getattr(getattr(params, group), name)
        if search.off:
            values[f"{key}:on"] = value is not None
        if value is not None:
            values[key] = min(max(value, search.low), search.high)
    return values


def tune(found: dict[str, list[Recording]], base: PipelineParams, quiet_sets: set[str], trials: int, seed: int,
         max_false_alarm: float, frozen: set[str]) -> tuple[PipelineParams, list[tuple[PipelineParams, Scores]]]:
    """Optuna's TPE search from `base` (its first trial); the chosen parameters and every trial's. Trials
    over `max_false_alarm` on a quiet set are infeasible (Optuna's constrained TPE looks for feasible
    ones first, then lower DER); when none is feasible, the lowest DER is chosen and the caller says so."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {key: value for key, value in search_space(base).items() if key not in frozen}
    measured: list[tuple[PipelineParams, Scores]] = []

    def objective(trial) -> float:
        params = suggest(trial, space, base)
        scores = evaluate(found, params, quiet_sets)
        trial.set_constraint("false_alarm", scores.worst_false_alarm - max_false_alarm)
        measured.append((params, scores))
        return scores.mean_der

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(20, trials))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.enqueue_trial(trial_values(base, space))
    with tqdm(total=trials, desc="tune", unit="trial", file=sys.stderr) as bar:
        study.optimize(objective, n_trials=trials, callbacks=[lambda *_: bar.update(1)])
    feasible = [pair for pair in measured if pair[1].worst_false_alarm <= max_false_alarm]
    best = min(feasible or measured, key=lambda pair: pair[1].mean_der)
    return best[0], measured


def retire_rules(found: dict[str, list[Recording]], chosen: PipelineParams, quiet_sets: set[str]
                 ) -> tuple[PipelineParams, list[str]]:
    """Switch off, one after another, each rule of `RULES_OFF` that the chosen parameters do not need:
    without it the mean DER is no higher and no quiet set gets more written speech. A rule that stays on
    has shown a gain on validation, in DER or in false alarm; the names of the retired ones."""
    scores = evaluate(found, chosen, quiet_sets)
    retired = []
    for rule, changes in RULES_OFF.items():
        without = chosen.with_values(changes)
        if without == chosen:
            continue  # already off
        candidate = evaluate(found, without, quiet_sets)
        quiet_no_worse = all(candidate.per_set[name] <= scores.per_set[name] for name in quiet_sets)
        if candidate.mean_der <= scores.mean_der and quiet_no_worse:
            chosen, scores = without, candidate
            retired.append(rule)
    return chosen, retired


def study_report(found: dict, quiet_sets: set[str], model: str, base: tuple[PipelineParams, Scores],
                 chosen: tuple[PipelineParams, Scores], measured: list[tuple[PipelineParams, Scores]],
                 max_false_alarm: float, feasible: bool, retired: list[str]) -> str:
    speech_sets = [name for name in sorted(found) if name not in quiet_sets]
    columns = speech_sets + [f"{name} #1" for name in sorted(chosen[1].one_speaker)] + sorted(quiet_sets & set(found))

    def cells(scores: Scores) -> list[float]:
        return ([scores.per_set[name] for name in speech_sets] + [scores.one_speaker[name] for name in
                sorted(chosen[1].one_speaker)] + [scores.per_set[name] for name in sorted(quiet_sets & set(found))])

    def line(label: str, scores: Scores) -> str:
        return f"| {label} | {scores.mean_der:.2f} | " + " | ".join(f"{v:.1f}" for v in cells(scores)) + " |"

    header = ["| parameters | mean DER | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    lines = ["# nanodrz tune", "",
             f"Model `{model}`; {sum(len(v) for v in found.values())} validation recordings in {len(found)} sets; "
             f"{len(measured)} Optuna TPE trials (the first: the model's current parameters). DER % at collar 0 "
             "with overlap scored; `#1`: % of one-speaker recordings given exactly one speaker; "
             f"{', '.join(sorted(quiet_sets & set(found))) or 'no set'}: seconds of speech written per minute "
             f"where nobody speaks (limit {max_false_alarm:g} s/min).", ""]
    if not feasible:
        lines += [f"No trial met the limit of {max_false_alarm:g} s/min where nobody speaks (post-processing alone "
                  "does not meet it for this model): the chosen parameters are those of the lowest mean DER.", ""]
    lines += header + [line("current", base[1]), line("**chosen**", chosen[1]), ""]
    already_off = [rule for rule, changes in RULES_OFF.items()
                   if rule not in retired and chosen[0].with_values(changes) == chosen[0]]
    lines += ["## Each rule switched off alone, from the chosen parameters", "",
              "A rule's gain is its row's mean DER minus the chosen one's. Retired (switched off in the chosen "
              "parameters: without them the mean DER is no higher and no quiet set gets more speech): "
              f"{', '.join(retired) or 'none'}. Off from the start: {', '.join(already_off) or 'none'}.", ""] + header
    for rule, changes in RULES_OFF.items():
        if rule not in retired and rule not in already_off:
            lines.append(line(f"no {rule}", evaluate(found, chosen[0].with_values(changes), quiet_sets)))
    lines += ["", "## Chosen parameters (changed from current)", ""]
    current, best = base[0].to_dict(), chosen[0].to_dict()
    changed = [(f"{group}.{name}", current[group][name], value) for group, fields in best.items()
               for name, value in fields.items() if current[group][name] != value]
    lines += [f"- `{key}`: {old} -> {new}" for key, old, new in changed] or ["- none"]
    return "\n".join(lines) + "\n"


def write_trials(path: Path, measured: list[tuple[PipelineParams, Scores]]) -> None:
    keys = sorted(search_space(PipelineParams()))
    with atomic_open(path) as handle:
        writer = csv.writer(handle)
        sets = sorted(measured[0][1].per_set)
        writer.writerow(["trial", "mean_der", *sets, *keys])
        for index, (params, scores) in enumerate(measured):
            values = params.to_dict()
            writer.writerow([index, f"{scores.mean_der:.3f}", *(f"{scores.per_set[s]:.3f}" for s in sets),
                             *(values[k.split('.')[0]][k.split('.')[1]] for k in keys)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sets", type=Path, help="a folder of validation set folders (WAV + RTTM)")
    parser.add_argument("--out", type=Path, required=True, help="write params.yaml, study.md and trials.csv here")
    parser.add_argument("--trials", type=int, default=100, help="Optuna trials (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    parser.add_argument("--quiet-sets", default="noise,music,tones",
                        help="comma-separated sets where nobody speaks (default noise,music,tones)")
    parser.add_argument("--max-false-alarm", type=float, default=1.0, metavar="SECONDS_PER_MINUTE",
                        help="most speech a feasible trial writes per minute of a quiet set (default 1)")
    parser.add_argument("--freeze", default="", metavar="KEYS",
                        help="comma-separated dotted parameters to keep at the model's values")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep the decoded sets here and reuse them on the next run (same model and decoding)")
    parser.add_argument("--store", action="store_true",
                        help="also write the chosen parameters into the model checkpoint's metadata")
    add_model_arguments(parser)
    add_pipeline_arguments(parser, skip=("--seed",))


def run(args: argparse.Namespace) -> int:
    check_run_arguments(args)
    changes = checked_changes(pipeline_changes(args))
    if args.trials < 1:
        raise NanodrzError("--trials must be at least 1")
    check_writable_folder(args.out, "--out")
    sets = read_sets(args.sets)
    torch.set_num_threads(args.threads)
    diarizer = Diarizer.from_pretrained(args.model, args.device, encoder_thread_count(args.encoder_threads))
    diarizer.params = diarizer.params.with_values(changes)  # the starting point, decoding included
    frozen = {key.strip() for key in args.freeze.split(",") if key.strip()}
    unknown = frozen - set(search_space(diarizer.params))
    if unknown:
        raise NanodrzError(f"--freeze {sorted(unknown)[0]}: not a searched parameter")
    if diarizer.params.resegment.nonspeech_threshold is None:  # segmentation-3.0 runs only with the gate on
        frozen.add("resegment.nonspeech_threshold")
    quiet = {name.strip() for name in args.quiet_sets.split(",") if name.strip()}
    found = decode_sets(diarizer, sets, args.batch_size, args.cache)
    base = (diarizer.params, evaluate(found, diarizer.params, quiet))
    chosen_params, measured = tune(found, diarizer.params, quiet & set(found), args.trials, args.seed,
                                   args.max_false_alarm, frozen)
    chosen_params, retired = retire_rules(found, chosen_params, quiet & set(found))
    chosen = (chosen_params, evaluate(found, chosen_params, quiet))
    feasible = chosen[1].worst_false_alarm <= args.max_false_alarm
    model = str(args.model or SHIPPED_MODEL)
    with atomic_open(args.out / "params.yaml") as handle:
        yaml.safe_dump(chosen_params.to_dict(), handle, sort_keys=False)
    with atomic_open(args.out / "study.md") as handle:
        handle.write(study_report(found, quiet, model, base, chosen, measured, args.max_false_alarm, feasible,
                                  retired))
    write_trials(args.out / "trials.csv", measured)
    print(f"mean validation DER {base[1].mean_der:.2f} -> {chosen[1].mean_der:.2f}; wrote {args.out}/params.yaml, "
          "study.md, trials.csv")
    if args.store:
        store_pipeline(args.model or SHIPPED_MODEL, chosen_params)
        print(f"stored the chosen parameters in {model}")
    return 0
