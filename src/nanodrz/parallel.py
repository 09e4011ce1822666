"""`nanodrz diarize --workers N`: N processes, one model each, share the files; one progress bar.

The files are cut into the groups of `--batch-size` consecutive files that one process decodes together,
and each worker decodes whole groups exactly as one process would, so the outputs are byte-identical to
`--workers 1` for any number of workers (with fewer groups than workers, some workers have nothing to do:
lower `--batch-size` to share few files). Workers are started with `spawn` (a fork of a process that has
run torch can deadlock) and run `--threads` torch threads each. The parent writes every output, shows
what the workers have read on one bar of audio seconds, and keeps each file's failure its own: a worker
that dies (killed, out of memory) fails only the files of the group it held, each with one error line.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from nanodrz.diarize import diarizer_for
from nanodrz.errors import NanodrzError
from nanodrz.longform import check_audio_file
from nanodrz.outputs import DiarizeOutput
from nanodrz.params import DiarizationSettings

# How often the parent looks at its workers when none has anything to say (seconds).
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs to diarize groups as `nanodrz diarize` would (picklable)."""

    model: Path | None
    device: str
    threads: int
    batch_size: int
    formats: frozenset[str]
    settings: DiarizationSettings
    changes: dict[str, Any]  # pipeline parameters changed from the model's
    enroll: dict[str, np.ndarray]
    encoder_threads: int  # torch threads of the frozen encoders' pass

    @property
    def cpus(self) -> int:
        """The cores one worker keeps busy at most (what a Ray actor reserves)."""
        return max(self.threads, self.encoder_threads)


def work(job: WorkerJob, tasks: multiprocessing.Queue, results: multiprocessing.Queue) -> None:
    """A worker's life: load the model (a failure, e.g. a bad checkpoint, ends the whole run), then
    diarize groups (index, [(name, path)]) until the None that says there are no more."""
    try:
        diarizer = diarizer_for(job.model, job.device, job.threads, job.changes, set(job.formats), job.encoder_threads)
    except NanodrzError as error:
        results.put(("fatal", str(error)))
        return

    def report(name: str, done: float, total: float) -> None:
        results.put(("progress", name, done, total))

    for index, group in iter(tasks.get, None):
        results.put(("started", multiprocessing.current_process().pid, index))
        outcomes = list(diarizer.outputs_many(group, job.settings, job.enroll, job.batch_size, on_progress=report))
        results.put(("done", index, outcomes))


def diarize_in_workers(found: Sequence[tuple[str, Path]], job: WorkerJob, workers: int, progress: bool
                       ) -> Iterator[tuple[str, DiarizeOutput | NanodrzError]]:
    """(name, output or error) for every file, in the order the groups finish."""
    groups = [list(found[first:first + job.batch_size]) for first in range(0, len(found), job.batch_size)]
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    tasks.cancel_join_thread()  # groups a dead worker never took must not hold this process at exit
    for task in enumerate(groups):
        tasks.put(task)
    processes = [context.Process(target=work, args=(job, tasks, results), daemon=True)
                 for _ in range(min(workers, len(groups)))]
    for _ in processes:
        tasks.put(None)
    bar = AudioSecondsBar(found, progress)
    try:
        for process in processes:
            process.start()
        yield from gather(groups, processes, results, bar)
    finally:
        bar.close()
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        tasks.close()
        results.close()


def gather(groups: list[list[tuple[str, Path]]], processes: list[BaseProcess], results: multiprocessing.Queue,
           bar: "AudioSecondsBar") -> Iterator[tuple[str, DiarizeOutput | NanodrzError]]:
    """Read the workers' messages until every group is done or lost with the worker that held it."""
    pending = set(range(len(groups)))
    held: dict[int, int] = {}  # worker pid -> the group it is decoding
    while pending:
        try:
            message = results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            lost = lost_groups(processes, held, pending)
            for index in sorted(lost):
                pending.discard(index)
                yield from finished([(name, NanodrzError(f"{name}: the worker process diarizing it died "
                                                         f"({lost[index]}); try it again alone"))
                                     for name, _ in groups[index]], bar)
            continue
        kind = message[0]
        if kind == "fatal":
            raise NanodrzError(message[1])
        if kind == "progress":
            bar.advance(*message[1:3])
        elif kind == "started":
            held[message[1]] = message[2]
        elif kind == "done" and message[1] in pending:
            index, outcomes = message[1:]
            pending.discard(index)
            held = {pid: group for pid, group in held.items() if group != index}
            yield from finished(outcomes, bar)


def finished(outcomes: list[tuple[str, DiarizeOutput | NanodrzError]], bar: "AudioSecondsBar"
             ) -> Iterator[tuple[str, DiarizeOutput | NanodrzError]]:
    """Pass a group's outcomes on, counting its files as read on the bar."""
    for name, outcome in outcomes:
        bar.finish(name)
        yield name, outcome


def lost_groups(processes: list[BaseProcess], held: dict[int, int], pending: set[int]) -> dict[int, str]:
    """Groups no worker will finish -> why: those held by a worker that died, and, once every worker
    has stopped, all still pending."""
    lost = {held[p.pid]: f"exit code {p.exitcode}" for p in processes
            if p.exitcode not in (None, 0) and held.get(p.pid) in pending}
    if all(p.exitcode is not None for p in processes):
        lost.update({index: "no worker left" for index in pending if index not in lost})
    return lost


class AudioSecondsBar:
    """One bar over the audio seconds of all files, fed by the workers' progress reports (on
    terminals only, and only when asked for)."""

    def __init__(self, found: Sequence[tuple[str, Path]], enabled: bool):
        self.seconds = {name: readable_seconds(path) for name, path in found} if enabled else {}
        self.done: dict[str, float] = {}
        self.bar = tqdm(total=round(sum(self.seconds.values()), 1), unit="s", file=sys.stderr,
                        disable=None if enabled else True)

    def advance(self, name: str, done: float) -> None:
        step = min(done, self.seconds.get(name, 0.0)) - self.done.get(name, 0.0)
        if step > 0:
            self.done[name] = self.done.get(name, 0.0) + step
            self.bar.update(round(step, 1))

    def finish(self, name: str) -> None:
        """A file is over (done or failed): its seconds count as processed."""
        self.advance(name, self.seconds.get(name, 0.0))

    def close(self) -> None:
        self.bar.close()


def readable_seconds(path: Path) -> float:
    """A file's length for the bar's total; 0 for a file that will fail (its worker reports why)."""
    try:
        return check_audio_file(path)
    except NanodrzError:
        return 0.0
