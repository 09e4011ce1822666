"""Command-line options shared by `nanodrz diarize`, `nanodrz sweep` and `nanodrz tune`.

Pipeline options default to nothing: a flag that is not given leaves the model's own tuned value (its
metadata, `params.PipelineParams`). Each flag is a short name for one dotted parameter; `--param
KEY=VALUE` and `--params FILE` reach every parameter, as `nanodrz tune` writes them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from nanodrz.errors import NanodrzError
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.pipeline import Diarizer

# flag -> (dotted parameter, help); values are parsed by `parameter_value`.
PIPELINE_FLAGS = {
    "--merge-threshold": ("merge.threshold", "merge two labels whose voices (the model's speaker embeddings where "
                          "each talks alone) have at least this cosine similarity; off = merge only to honour "
                          "--max-speakers"),
    "--refine-passes": ("refine.passes", "rounds of re-labelling single-speaker stretches by voice, each followed "
                        "by merging (0 = keep the labels the model wrote)"),
    "--speech-threshold": ("resegment.speech_threshold", "cut written turns where the model's overlap head gives "
                           "silence at least this probability, and add the nearest speaker where it gives speech "
                           "at least this and nothing is written (models with an overlap head; off)"),
    "--overlap-threshold": ("resegment.overlap_threshold", "add the nearest other speaker where the overlap head "
                            "gives two or more speakers at least this probability and one is written (off)"),
    "--nonspeech-threshold": ("resegment.nonspeech_threshold", "cut written turns where segmentation-3.0 gives no "
                              "speech at least this probability (models with the campplus_segmentation front "
                              "end; off)"),
    "--eos-penalty": ("decoding.eos_penalty", "subtracted from the end-of-answer logit (nats): higher keeps the "
                      "model writing turns"),
    "--decoding": ("decoding.strategy", "greedy, beam or sample"),
    "--beam-size": ("decoding.beam_size", "beams per input for --decoding beam"),
    "--temperature": ("decoding.temperature", "for --decoding sample"),
    "--top-p": ("decoding.top_p", "nucleus for --decoding sample"),
    "--seed": ("decoding.seed", "seed for --decoding sample"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint .safetensors (default: the shipped model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="recordings decoded together (default: 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: small models decode token by token fastest on one "
                             "thread; raise it for large models)")
    parser.add_argument("--encoder-threads", type=int,
                        help="CPU threads for the frozen encoders (CAM++, segmentation-3.0), which run over each "
                             "model input before the model; the answers do not depend on it (default: the cores "
                             "this process may use, shared among --workers)")


def add_speaker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-speakers", type=int, help="exact number of speakers, when known")
    parser.add_argument("--min-speakers", type=int, default=0)
    parser.add_argument("--max-speakers", type=int)
    parser.add_argument("--exclusive", action="store_true", help="at most one speaker at a time (for ASR alignment)")


def add_pipeline_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The flags of `PIPELINE_FLAGS` (less `skip`, which a command uses for something else), `--param`
    and `--params`."""
    group = parser.add_argument_group("pipeline parameters (default: the model's tuned values)")
    for flag, (key, text) in PIPELINE_FLAGS.items():
        if flag not in skip:
            group.add_argument(flag, dest=key, metavar="VALUE", help=f"{text} [{key}]")
    group.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="any pipeline parameter by its dotted name, e.g. refine.switch_penalty=0.3 (repeatable)")
    group.add_argument("--params", type=Path, metavar="FILE",
                       help="a YAML or JSON file of pipeline parameters, as `nanodrz tune` writes them")


def parameter_value(text: str) -> Any:
    """A value as YAML reads it; "off" and "none" are None."""
    if text.strip().lower() in ("off", "none", "null"):
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def pipeline_changes(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted parameter -> value for every pipeline option given (`--params` first, then `--param`, then
    the named flags)."""
    changes: dict[str, Any] = {}
    if getattr(args, "params", None) is not None:
        changes.update(read_params_file(args.params))
    for item in getattr(args, "param", []):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NanodrzError(f"--param {item!r} must look like KEY=VALUE")
        changes[key.strip()] = parameter_value(value)
    for _, (key, _) in PIPELINE_FLAGS.items():
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = parameter_value(value)
    return changes


def read_params_file(path: Path) -> dict[str, Any]:
    """A parameters file as dotted keys: {"merge": {"threshold": 0.8}} -> {"merge.threshold": 0.8}."""
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise NanodrzError(f"--params {path}: cannot read ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict) or not all(isinstance(group, dict) for group in values.values()):
        raise NanodrzError(f"--params {path}: expected a mapping of groups (merge, refine, ...) to mappings")
    return {f"{group}.{name}": value for group, fields in values.items() for name, value in fields.items()}


def speaker_settings(args: argparse.Namespace) -> DiarizationSettings:
    return DiarizationSettings(num_speakers=args.num_speakers, min_speakers=args.min_speakers,
                               max_speakers=args.max_speakers, exclusive=args.exclusive)


def check_run_arguments(args: argparse.Namespace) -> None:
    if args.threads < 1 or args.batch_size < 1:
        raise NanodrzError("--threads and --batch-size must be at least 1")
    if args.encoder_threads is not None and args.encoder_threads < 1:
        raise NanodrzError("--encoder-threads must be at least 1")


def encoder_thread_count(requested: int | None, processes: int = 1) -> int:
    """`--encoder-threads`, or by default the cores this process may use shared among `processes`."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)


def load_diarizer(model: Path | None, device: str, threads: int, changes: dict[str, Any],
                  encoder_threads: int | None = None) -> Diarizer:
    """A diarizer whose parameters are its model's with `changes` applied."""
    torch.set_num_threads(threads)
    diarizer = Diarizer.from_pretrained(model, device, encoder_threads)
    diarizer.params = diarizer.params.with_values(changes)
    return diarizer


def checked_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes`, refused before any model loads if they name no parameter or a bad value."""
    PipelineParams().with_values(changes)
    return changes
