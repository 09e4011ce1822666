"""`nanodrz ray`: `nanodrz diarize` over a Ray cluster, resumable, for more files than one machine can take.

Needs the `ray` extra (`pip install "nanodrz[ray]"`). Inputs are audio files, folders and quoted glob
patterns (`'calls/**/*.wav'`, named by their path under the pattern's fixed folder, as a folder's files
are), and `--list FILE`s of paths, one a line (relative ones from the list's folder, named by their path
under it). Outputs are those of `nanodrz diarize --out` (`--format`, `--plot`), next to a manifest
(`OUT/manifest.jsonl`, one JSON line a file and attempt: name, input, status done or failed, outputs or
error). A re-run of the same command skips every file whose manifest entry says done under the same
model, parameters and --batch-size and whose outputs all exist, and retries the rest.

Why Ray actors and not Ray Data: outputs are byte-identical to a local run only if files are decoded in
the same groups of `--batch-size` consecutive files (batching changes the arithmetic), which actors fed
whole groups give exactly and Ray Data's block-sized batches do not; each actor loads its model once, a
group's failure stays its own, results are small Python objects rather than Arrow rows, and core Ray
is the only dependency. The driver, this command, forms the groups as `nanodrz diarize` does, hands
them to actors (`--actors`, default: as many as the cluster's CPUs / `--threads`, or its GPUs with
`--device cuda`, one GPU each), and writes every output itself, atomically, then the file's manifest
line; so a file is recorded done only once all its outputs are whole, a run killed at any point leaves
nothing a re-run would take for done, and one lock on the manifest keeps two runs out of one folder. An
actor that dies (killed, out of memory, its node lost) fails only the files of the group it held, and a
new actor takes its place; a model that cannot load ends the run with one line.

On a real cluster: start a head node (`ray start --head --port=6379`) and join every other machine to it
(`ray start --address=HEAD_IP:6379`, with `--num-gpus` if Ray does not see them), each with the same
Python environment and nanodrz installed. Run this command on the head node, or anywhere with
`--address HEAD_IP:6379` or `RAY_ADDRESS=HEAD_IP:6379`; without either it joins the cluster `ray start`
began on this machine, or else starts a local one. Workers read the inputs (and `--model`, `--enroll`
clips) by the paths the driver sees, so put them on storage every node mounts at the same path (NFS, a
shared file system, a bucket mounted with FUSE); `--out` need only be writable by the driver. Where
the cluster uses token authentication (Ray 2.59 turns it on for clusters started on one machine), give
the driver the same `RAY_AUTH_MODE=token` and token (`ray get-auth-token`, `~/.ray/auth_token` or
`RAY_AUTH_TOKEN`) as the nodes. Outputs are byte-identical to `nanodrz diarize` given the same files in
the same order with the same --batch-size and model, on the same kind of hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from tqdm import tqdm

from nanodrz.commandline import (add_model_arguments, add_pipeline_arguments, add_speaker_arguments,
                                 check_run_arguments, checked_changes, pipeline_changes, speaker_settings)
from nanodrz.diarize import check_distinct_outputs, diarizer_for, find_audio, parse_enrollment
from nanodrz.errors import NanodrzError
from nanodrz.fileio import check_writable_folder
from nanodrz.longform import AUDIO_EXTENSIONS
from nanodrz.outputs import DiarizeOutput, parse_formats, write_outputs
from nanodrz.parallel import WorkerJob
from nanodrz.pipeline import SHIPPED_MODEL

Group = list[tuple[str, Path]]
Outcome = tuple[str, DiarizeOutput | NanodrzError]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="AUDIO_DIR_OR_GLOB",
                        help="audio files, directories, or quoted glob patterns ('calls/**/*.wav')")
    parser.add_argument("--list", action="append", default=[], type=Path, metavar="FILE",
                        help="a file of audio paths, one a line, relative ones from its folder (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="write the NAME.* outputs and the manifest here")
    parser.add_argument("--manifest", type=Path, help="the manifest of done and failed files "
                        "(default: OUT/manifest.jsonl)")
    parser.add_argument("--format", default="rttm", help="comma-separated output formats, as for nanodrz diarize: "
                        "rttm, exclusive-rttm, json, embeddings")
    parser.add_argument("--plot", action="store_true", help="also write a timeline plot NAME.png")
    parser.add_argument("--enroll", action="append", default=[], metavar="NAME=CLIP",
                        help="name a speaker from an enrollment clip (repeatable)")
    parser.add_argument("--address", help="the Ray cluster, HOST:PORT (default: RAY_ADDRESS, else the cluster "
                        "`ray start` began on this machine, else a new local one)")
    parser.add_argument("--actors", type=int, help="Ray actors, one model each (default: the cluster's CPUs "
                        "divided by --threads, or its GPUs with --device cuda)")
    add_model_arguments(parser)
    add_speaker_arguments(parser)
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, True)
    check_run_arguments(args)
    if args.actors is not None and args.actors < 1:
        raise NanodrzError("--actors must be at least 1")
    if args.device.startswith("cuda") and args.device != "cuda":
        raise NanodrzError("give --device cuda: Ray gives each actor its own GPU")
    if not args.inputs and not args.list:
        raise NanodrzError("give audio files, directories, glob patterns or --list FILE")
    job = WorkerJob(args.model, args.device, args.threads, args.batch_size, frozenset(formats),
                    speaker_settings(args), checked_changes(pipeline_changes(args)), parse_enrollment(args.enroll),
                    args.encoder_threads or args.threads)  # by default the CPUs each actor reserves
    check_writable_folder(args.out, "--out")
    found, errors = find_inputs(args.inputs, args.list)
    check_distinct_outputs(found)
    manifest = args.manifest or args.out / "manifest.jsonl"
    with open_manifest(manifest) as (entries, handle):
        skipped, failed = diarize_files(found, job, args, entries, handle)
    errors += failed
    for error in errors:
        print(f"nanodrz ray: error: {error}", file=sys.stderr)
    print(f"nanodrz ray: {len(found)} files: {len(found) - skipped - len(failed)} diarized, {skipped} already done, "
          f"{len(failed)} failed; manifest {manifest}", file=sys.stderr)
    return 1 if errors else 0


def diarize_files(found: list[tuple[str, Path]], job: WorkerJob, args: argparse.Namespace, entries: dict[str, dict],
                  manifest: IO[str]) -> tuple[int, list[NanodrzError]]:
    """Diarize every file not done yet, in the groups a local run would decode, writing each group's
    outputs and then its manifest lines as it finishes; (files skipped, errors of files that failed).
    Ray is joined only when there is something to do."""
    formats, key, out, plot = set(job.formats), job_key(job), args.out, args.plot
    done = {name for name, _ in found if is_done(entries.get(name), key, out, name, formats, plot)}
    groups = [found[first:first + job.batch_size] for first in range(0, len(found), job.batch_size)]
    todo = [group for group in groups if any(name not in done for name, _ in group)]
    failed = []
    with contextlib.ExitStack() as stack:
        if todo:
            stack.enter_context(connected(args.address))
        bar = stack.enter_context(tqdm(total=len(found) - len(done), unit="file", file=sys.stderr, disable=None))
        results = stack.enter_context(contextlib.closing(diarize_on_ray(todo, job, args.actors)))
        for group, outcomes in results:
            lines = []
            for (name, path), (_, outcome) in zip(group, outcomes):
                if name in done:
                    continue  # decoded again only for its group mates; its outputs stand
                outcome = written(name, outcome, out, formats, plot)
                if isinstance(outcome, NanodrzError):
                    failed.append(outcome)
                lines.append(manifest_line(name, path, outcome, key, formats, plot))
                bar.update(1)
            manifest.write("".join(lines))
            manifest.flush()
            os.fsync(manifest.fileno())
    return len(done), failed


def find_inputs(inputs: Sequence[str], lists: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[NanodrzError]]:
    """(name, absolute path) of every input, in the order given, and an error for each that yields nothing.

    Files and folders are named as `nanodrz diarize` names them; a glob's matches by their path under the
    pattern's fixed leading folder, and a list's entries by their path under the list's folder (else by
    their stem), without the extension, so adding files never renames the others' outputs.
    """
    found, errors = [], []
    for raw in inputs:
        if glob.has_magic(raw):
            matches = sorted(Path(p) for p in glob.glob(raw, recursive=True)
                             if Path(p).suffix.lower() in AUDIO_EXTENSIONS and Path(p).is_file())
            if not matches:
                errors.append(NanodrzError(f"{raw}: matches no audio files"))
            base = Path(*Path(raw).parent.parts[:fixed_parts(raw)])
            found += [(named(path, base), path) for path in matches]
        else:
            files, missing = find_audio([raw])
            found += files
            errors += missing
    for path in lists:
        entries, missing = list_entries(path)
        found += entries
        errors += missing
    return [(name, path.absolute()) for name, path in found], errors


def fixed_parts(pattern: str) -> int:
    """How many leading folders of a glob pattern hold no wildcard."""
    count = 0
    for part in Path(pattern).parent.parts:
        if glob.has_magic(part):
            break
        count += 1
    return count


def named(path: Path, base: Path) -> str:
    """A file's output name: its path under `base` without the extension, or its stem when outside."""
    try:
        return path.absolute().relative_to(base.absolute()).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def list_entries(path: Path) -> tuple[list[tuple[str, Path]], list[NanodrzError]]:
    """The audio files a list names (blank lines and # comments skipped), each missing one an error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NanodrzError(f"--list {path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    found, errors = [], []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        audio = path.parent / entry
        if audio.is_file():
            found.append((named(audio, path.parent), audio))
        else:
            errors.append(NanodrzError(f"{path}:{number}: {entry}: no such file"))
    return found, errors


def job_key(job: WorkerJob) -> str:
    """A digest of everything a file's outputs depend on: the model's bytes, the speaker settings, the
    pipeline parameters, the groups' size and the enrollment clips; a re-run redoes files done under
    another."""
    model = Path(job.model) if job.model is not None else SHIPPED_MODEL
    digest = hashlib.sha256()
    try:
        with open(model, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise NanodrzError(f"--model {model}: cannot read ({error.strerror or error}); the driver and every "
                           "worker must see it at this path") from None
    digest.update(json.dumps([asdict(job.settings), job.changes, job.batch_size], sort_keys=True,
                             default=str).encode())
    for name, clip in sorted(job.enroll.items()):
        digest.update(name.encode() + clip.tobytes())
    return digest.hexdigest()[:16]


def output_files(name: str, formats: set[str], plot: bool) -> list[str]:
    """The files `outputs.write_outputs` writes for NAME under the output folder."""
    relative = Path(name.replace(" ", "_"))
    suffixes = {"rttm": ".rttm", "exclusive-rttm": ".exclusive.rttm", "json": ".json",
                "embeddings": ".embeddings.npz"}
    wanted = [suffix for fmt, suffix in suffixes.items() if fmt in formats] + ([".png"] if plot else [])
    return [relative.with_name(relative.name + suffix).as_posix() for suffix in wanted]


def is_done(entry: dict | None, key: str, out: Path, name: str, formats: set[str], plot: bool) -> bool:
    return (entry is not None and entry.get("status") == "done" and entry.get("job") == key
            and all((out / file).is_file() for file in output_files(name, formats, plot)))


@contextlib.contextmanager
def open_manifest(path: Path) -> Iterator[tuple[dict[str, dict], IO[str]]]:
    """The manifest's last entry per name, and the manifest open for appending, locked for this run.

    A line that a killed run cut short is not JSON and is passed over; appending starts on a new line.
    """
    if path.is_dir():
        raise NanodrzError(f"--manifest {path}: is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NanodrzError(f"{path}: another run is writing this manifest; wait for it, or give another "
                               "--out or --manifest") from None
        handle.seek(0)
        text = handle.read()
        entries = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                entries[entry["name"]] = entry
        if text and not text.endswith("\n"):
            handle.write("\n")
        yield entries, handle


def manifest_line(name: str, path: Path, outcome: DiarizeOutput | NanodrzError, key: str, formats: set[str],
                  plot: bool) -> str:
    entry: dict[str, Any] = {"name": name, "input": str(path), "job": key}
    if isinstance(outcome, NanodrzError):
        entry.update(status="failed", error=str(outcome))
    else:
        entry.update(status="done", outputs=output_files(name, formats, plot))
    return json.dumps(entry) + "\n"


def written(name: str, outcome: DiarizeOutput | NanodrzError, out: Path, formats: set[str], plot: bool
            ) -> DiarizeOutput | NanodrzError:
    """Write a file's outputs; a full disk fails this file, not the run."""
    if isinstance(outcome, NanodrzError):
        return outcome
    try:
        write_outputs(name, outcome, out, formats, plot)
    except OSError as error:
        return NanodrzError(f"{name}: cannot write the output ({error.strerror or error})")
    return outcome


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Ray, joined (or started) for this run and left after it; one already joined by the caller is kept."""
    try:
        import ray
    except ImportError:
        raise NanodrzError('nanodrz ray needs Ray: pip install "nanodrz[ray]"') from None
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise NanodrzError(f"cannot join the Ray cluster {address or ''}: {first_line(error)} (is it running, and "
                           "does this machine have its token, RAY_AUTH_MODE=token and ~/.ray/auth_token?)") from None
    try:
        yield
    finally:
        ray.shutdown()


class GroupDiarizer:
    """One Ray actor: one model, loaded once, that diarizes whole groups as `nanodrz diarize` would."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.diarizer, self.error = None, None
        try:
            self.diarizer = diarizer_for(job.model, job.device, job.threads, job.changes, set(job.formats),
                                         job.encoder_threads)
        except NanodrzError as error:  # reported by `ready`, so the driver ends the run with this line
            self.error = str(error)

    def ready(self) -> str | None:
        return self.error

    def diarize(self, group: Group) -> list[Outcome]:
        return list(self.diarizer.outputs_many(group, self.job.settings, self.job.enroll, self.job.batch_size))


def diarize_on_ray(groups: list[Group], job: WorkerJob, actors: int | None) -> Iterator[tuple[Group, list[Outcome]]]:
    """(group, [(name, output or error)]) for every group, in the order they finish.

    Groups go only to actors that have loaded their model, so actors the cluster cannot place yet (all
    busy, or waiting for an autoscaler) hold no work back.
    """
    if not groups:
        return
    import ray
    from ray.exceptions import RayActorError, RayError

    remote = ray.remote(GroupDiarizer).options(num_cpus=job.cpus,
                                               num_gpus=1 if job.device == "cuda" else 0,
                                               max_restarts=0, max_task_retries=0)
    fits = capacity(job)  # refuses, before any actor starts, a cluster where none fits
    count = min(actors or fits, len(groups))
    starting = {}  # ready() reference -> actor
    running = {}  # diarize() reference -> (actor, group)
    deaths = 0  # actors lost before their first group

    def start() -> None:
        actor = remote.remote(job)
        starting[actor.ready.remote()] = actor

    def submit(actor) -> None:
        if waiting:
            group = waiting.pop()
            running[actor.diarize.remote(group)] = (actor, group)
        else:
            ray.kill(actor)

    waiting = list(reversed(groups))
    for _ in range(count):
        start()
    try:
        while waiting or running:
            [reference], _ = ray.wait(list(starting) + list(running), num_returns=1)
            if reference in starting:
                actor = starting.pop(reference)
                try:
                    error = ray.get(reference)
                except RayActorError as died:
                    deaths += 1
                    if deaths > count:
                        raise NanodrzError(f"the Ray actors die as they load the model: {first_line(died)}") from None
                    start()
                    continue
                if error is not None:
                    raise NanodrzError(error)
                submit(actor)
                continue
            actor, group = running.pop(reference)
            try:
                outcomes = ray.get(reference)
            except RayActorError as died:
                ray.kill(actor)
                if waiting:
                    start()
                outcomes = [(name, NanodrzError(f"{name}: the Ray actor diarizing it died ({first_line(died)}); a "
                                                "re-run retries it")) for name, _ in group]
            except RayError as error:
                if isinstance(error, NanodrzError):  # the whole run's problem, e.g. too many enrolled speakers
                    raise NanodrzError(first_line(error)) from None
                outcomes = [(name, NanodrzError(f"{name}: {first_line(error)}")) for name, _ in group]
                submit(actor)
            else:
                submit(actor)
            yield group, outcomes
    finally:
        for actor in list(starting.values()) + [actor for actor, _ in running.values()]:
            ray.kill(actor)


def capacity(job: WorkerJob) -> int:
    """How many actors the cluster holds at once: its GPUs (--device cuda), or its CPUs for `job.cpus`
    each; refused when not even one fits on any node, rather than waiting for ever."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    resource, each = ("GPU", 1) if job.device == "cuda" else ("CPU", job.cpus)
    if not any(node.get(resource, 0) >= each for node in nodes):
        raise NanodrzError(f"no node of the Ray cluster has {each} {resource}{'s' if each > 1 else ''} for an "
                           f"actor" + (" (lower --threads and --encoder-threads)" if resource == "CPU" else ""))
    return max(1, sum(int(node.get(resource, 0) // each) for node in nodes))


def first_line(error: BaseException) -> str:
    """An exception as one line: a Ray error's own cause where it carries one."""
    cause = getattr(error, "cause", None)
    lines = str(cause if isinstance(cause, BaseException) else error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
