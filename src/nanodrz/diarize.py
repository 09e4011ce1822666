"""`nanodrz diarize`: audio files and folders in, RTTM (and JSON, exclusive RTTM, embeddings, plots) out.

A thin layer over `pipeline.Diarizer`: it finds the files, checks every input and output before the
model loads, runs one process or `--workers N` (`parallel`), and keeps each file's failure its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nanodrz.commandline import (add_model_arguments, add_pipeline_arguments, add_speaker_arguments,
                                 check_run_arguments, checked_changes, encoder_thread_count, load_diarizer,
                                 pipeline_changes, speaker_settings)
from nanodrz.errors import NanodrzError
from nanodrz.fileio import check_writable_folder
from nanodrz.longform import AUDIO_EXTENSIONS, enrollment_clip
from nanodrz.outputs import parse_formats, write_outputs
from nanodrz.params import ResegmentParams


def find_audio(paths: Iterable[str]) -> tuple[list[tuple[str, Path]], list[NanodrzError]]:
    """Audio files with their output names; a path that yields nothing is an error.

    A file given by name is named by its stem; a directory is searched recursively and each file is
    named by its path inside it, without the extension (`dir/a/x.wav` -> `a/x`), so outputs keep
    the input's layout under `--out`. Special files (pipes, devices) are reported, never opened.
    """
    found, errors = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir())
            if not inside:
                errors.append(NanodrzError(f"{path}: directory holds no audio files"))
            found += [(p.relative_to(path).with_suffix("").as_posix(), p) for p in inside]
        elif path.is_file():
            found.append((path.stem, path))
        elif path.exists():
            errors.append(NanodrzError(f"{path}: not a regular file (pipes, devices and folders are not audio files)"))
        else:
            errors.append(NanodrzError(f"{path}: no such file or directory"))
    return found, errors


def check_distinct_outputs(found: Sequence[tuple[str, Path]]) -> None:
    """Refuse, before any work, two inputs that would write the same output files."""
    first: dict[str, Path] = {}
    for name, path in found:
        key = name.replace(" ", "_")
        if key in first:
            raise NanodrzError(f"{first[key]} and {path} would both be written as {key}.*: rename one, or diarize "
                               "them in separate calls with different --out folders")
        first[key] = path


def parse_enrollment(values: Sequence[str]) -> dict[str, np.ndarray]:
    """NAME=clip pairs, each clip read and checked (long enough, not silent) before the model loads."""
    enroll = {}
    for value in values:
        name, sep, clip = value.partition("=")
        if not sep or not name or not clip:
            raise NanodrzError(f"--enroll {value!r} must look like NAME=clip.wav")
        if name in enroll:
            raise NanodrzError(f"--enroll names {name!r} twice")
        if not Path(clip).is_file():
            raise NanodrzError(f"--enroll {name}: no such file {clip}")
        enroll[name] = enrollment_clip(name, clip, ResegmentParams.silence_dbfs)
    return enroll


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files or directories")
    parser.add_argument("--out", type=Path, help="write the NAME.* files of --format and --plot here "
                        "(default: RTTM to stdout)")
    parser.add_argument("--format", default="rttm",
                        help="comma-separated output formats: rttm (NAME.rttm), exclusive-rttm (NAME.exclusive.rttm: "
                             "at most one speaker at a time), json (NAME.json), embeddings (NAME.embeddings.npz: "
                             "'labels' and one unit CAM++ speaker embedding per label in 'embeddings'; needs --out)")
    parser.add_argument("--plot", action="store_true", help="also write a timeline plot NAME.png")
    parser.add_argument("--enroll", action="append", default=[], metavar="NAME=CLIP",
                        help="name a speaker from an enrollment clip (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, one model each (default 1); each takes whole groups of --batch-size "
                             "files, so the outputs are the same as with one")
    add_model_arguments(parser)
    add_speaker_arguments(parser)
    add_pipeline_arguments(parser)


def diarizer_for(model: Path | None, device: str, threads: int, changes: dict, formats: set[str],
                 encoder_threads: int | None = None):
    """The diarizer of one process running `nanodrz diarize`, refusing formats its model cannot give."""
    diarizer = load_diarizer(model, device, threads, changes, encoder_threads)
    if "embeddings" in formats and not diarizer.has_voice_track:
        raise NanodrzError("--format embeddings needs a model whose front end computes speaker embeddings "
                           "(campplus_windows or campplus_segmentation); this one does not")
    return diarizer


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, args.out is not None)
    settings = speaker_settings(args)
    changes = checked_changes(pipeline_changes(args))
    check_run_arguments(args)
    if args.workers < 1:
        raise NanodrzError("--workers must be at least 1")
    if args.out is not None:
        check_writable_folder(args.out, "--out")
    found, errors = find_audio(args.inputs)
    check_distinct_outputs(found)
    enroll = parse_enrollment(args.enroll)
    encoder_threads = encoder_thread_count(args.encoder_threads, args.workers)
    if args.workers > 1:
        from nanodrz.parallel import WorkerJob, diarize_in_workers  # it imports this module

        job = WorkerJob(args.model, args.device, args.threads, args.batch_size, frozenset(formats), settings, changes,
                        enroll, encoder_threads)
        outcomes = diarize_in_workers(found, job, args.workers, progress=len(found) > 1)
    else:
        diarizer = diarizer_for(args.model, args.device, args.threads, changes, formats, encoder_threads)
        outcomes = diarizer.outputs_many(found, settings, enroll, args.batch_size, progress=len(found) > 1)
    failed: dict[str, NanodrzError] = {}
    for name, outcome in outcomes:
        if not isinstance(outcome, NanodrzError):
            try:
                write_outputs(name, outcome, args.out, formats, args.plot)
                continue
            except OSError as error:  # a full disk loses this file's output, not the others'
                outcome = NanodrzError(f"{name}: cannot write the output ({error.strerror or error})")
        failed[name] = outcome
    # In input order, however the workers finished.
    errors += [failed[name] for name, _ in found if name in failed]
    for error in errors:
        print(f"nanodrz diarize: error: {error}", file=sys.stderr)
    return 1 if errors else 0
