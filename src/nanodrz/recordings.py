"""Annotated recordings as training data: fine-tuning on a user's own audio with RTTM references.

A source is a folder of audio files, each with an RTTM of the same stem next to it (and optionally a
UEM `<stem>.uem` saying which stretches are annotated), or a list file of lines `audio rttm [uem]`.
Every annotated stretch of a recording becomes a `simulate.Conversation` whose audio is read from
disk only where it is sliced, so `examples.build_example` cuts chunks and picks prompt clips from it
exactly as it does from simulated conversations, and hours-long recordings cost no memory.

Recordings are held out for validation whole, chosen by a hash of (seed, name), and the training
stream (`nanodrz.stream`) takes sample i from the recordings when a generator seeded by
(seed, RECORDINGS_STREAM, i) says so: the mix is the same for any number of DataLoader workers or
torchrun ranks, and resumable.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from nanodrz.annotation import Turn, read_rttm
from nanodrz.audio import SAMPLE_RATE, resample, to_mono
from nanodrz.longform import AUDIO_EXTENSIONS
from nanodrz.errors import ConfigError, NanodrzError
from nanodrz.evaluate import Uem, read_uem
from nanodrz.examples import Example, ExampleConfig, build_example
from nanodrz.simulate import Conversation

RECORDINGS_STREAM = 3  # keeps the recordings' draws apart from the stream's own and fixed examples' (2)


@dataclass
class RecordingsConfig:
    """path: a folder of audio files with `<stem>.rttm` (and optionally `<stem>.uem`) next to each, or
    a list file of lines `audio rttm [uem]` (relative paths start at the list's folder); uem: one UEM
    file for all of them (by file id; recordings it does not name are annotated throughout); ratio: share
    of training examples cut from the recordings, the rest simulated; validation_fraction: share of the
    recordings held out whole as the validation set `recordings`; seed: which ones are held out.
    """

    path: str
    uem: str | None = None
    ratio: float = 0.5
    validation_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not self.path:
            raise ConfigError("recordings.path must name a folder or a list file")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"recordings.ratio must lie in [0, 1], got {self.ratio:g}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"recordings.validation_fraction must lie in [0, 1), got {self.validation_fraction:g}")
        if self.seed < 0:
            raise ConfigError(f"recordings.seed must not be negative, got {self.seed}")


@dataclass(frozen=True)
class Recording:
    """One annotated recording: its name in the source (path without extension), its file id (the RTTM's),
    its audio file, reference turns, and the stretches they annotate."""

    name: str
    file_id: str
    audio: Path
    turns: tuple[Turn, ...]
    regions: tuple[tuple[float, float], ...]

    @property
    def annotated_seconds(self) -> float:
        return sum(end - start for start, end in self.regions)


class RecordingAudio:
    """Samples [first, first + length) of an audio file at 16 kHz mono, read only when sliced.

    Stands in for a conversation's array: `len()`, `.shape` and slices with step 1 are all that
    `build_example` uses. Files at other rates are resampled slice by slice, with a margin read either
    side so that the filter has settled where the slice begins and ends.
    """

    def __init__(self, path: Path, first: int, length: int):
        self.path, self.first, self.length = path, first, length

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("recording audio is read by slices only")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise TypeError("recording audio is read by slices with step 1 only")
        return read_samples(self.path, self.first + start, self.first + max(start, stop))


def read_samples(path: Path, first: int, stop: int) -> np.ndarray:
    """Samples [first, stop) of `path` as 16 kHz mono float32 (zeros past the end of the file)."""
    count = stop - first
    with sf.SoundFile(str(path)) as handle:
        rate = handle.samplerate
        if rate == SAMPLE_RATE:
            handle.seek(min(first, handle.frames))
            audio = to_mono(handle.read(count, dtype="float32", always_2d=True))
        else:  # start on a sample that falls on the 16 kHz grid too, so the slice is not shifted
            common = math.gcd(rate, SAMPLE_RATE)
            source_period, target_period = rate // common, SAMPLE_RATE // common
            margin = -(-SAMPLE_RATE // 20 // target_period)  # periods in 50 ms
            period = max(0, first // target_period - margin)
            source_first = period * source_period
            source_stop = min(handle.frames, -(-stop * rate // SAMPLE_RATE) + margin * source_period)
            handle.seek(min(source_first, handle.frames))
            audio = resample(to_mono(handle.read(max(0, source_stop - source_first), dtype="float32",
                                                 always_2d=True)), rate)
            skip = first - period * target_period
            audio = audio[skip:skip + count]
    return np.pad(audio, (0, count - len(audio))).astype(np.float32, copy=False)


def conversations(recording: Recording) -> list[Conversation]:
    """One conversation per annotated stretch: lazily read audio and the turns inside it, from 0 s."""
    result = []
    for start, end in recording.regions:
        first, stop = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
        turns = [Turn(max(t.start, start) - start, min(t.end, end) - start, t.speaker)
                 for t in recording.turns if t.end > start and t.start < end]
        result.append(Conversation(RecordingAudio(recording.audio, first, stop - first), SAMPLE_RATE, turns,
                                   {"recording": recording.name, "region": [start, end]}))
    return result


class RecordingSource:
    """The recordings' side of the training stream; picklable, so DataLoader workers get a copy.

    Sample `index` comes from the recordings with probability `ratio`; its stretch is drawn in
    proportion to length, so every annotated second is equally likely to be chunked.
    """

    def __init__(self, recordings: Sequence[Recording], ratio: float):
        self.ratio = ratio
        self.conversations = [c for recording in recordings for c in conversations(recording)]
        lengths = np.asarray([len(c.audio) for c in self.conversations], dtype=np.float64)
        self.weights = lengths / lengths.sum() if len(lengths) else lengths

    def draw(self, seed: int, index: int) -> tuple[Conversation, np.random.Generator] | None:
        """The stretch of sample `index` of the stream and the generator to go on with (to cut it), if the
        sample is one of the recordings'; else None (simulate it)."""
        rng = np.random.default_rng([seed, RECORDINGS_STREAM, index])
        if rng.random() >= self.ratio:
            return None
        return self.conversations[int(rng.choice(len(self.conversations), p=self.weights))], rng


def validation_examples(recordings: Sequence[Recording], examples: ExampleConfig, max_seconds: float,
                        count: int, seed: int) -> list[Example]:
    """The same `count` prompted chunks of the held-out recordings for a given seed, held in memory."""
    source = RecordingSource(recordings, 1.0)
    examples_made = []
    for index in range(count):
        conversation, rng = source.draw(seed, index)
        examples_made.append(build_example(conversation, examples, max_seconds, rng))
    return examples_made


# --- reading a source ------------------------------------------------------------------------------
def find_recordings(path: Path) -> list[tuple[str, Path, Path | None, Path | None]]:
    """(name, audio, rttm, uem) of every recording of a folder or list file; RTTM None when missing."""
    if not path.exists():
        raise NanodrzError(f"recordings: {path}: no such folder or list file")
    if path.is_dir():
        audio = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        rttms = {p.with_suffix("") for p in path.rglob("*.rttm")}
        stray = sorted(rttms - {p.with_suffix("") for p in audio})
        if stray:
            raise NanodrzError(f"recordings: {stray[0]}.rttm has no audio file of the same stem next to it")
        found = [(p.relative_to(path).with_suffix("").as_posix(), p, p.with_suffix(".rttm"), p.with_suffix(".uem"))
                 for p in audio]
        found = [(name, a, rttm if rttm.is_file() else None, uem if uem.is_file() else None)
                 for name, a, rttm, uem in found]
    else:
        found = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (2, 3):
                raise NanodrzError(f"recordings: {path}:{number}: expected 'audio rttm [uem]', "
                                   f"got {len(fields)} fields")
            audio, rttm, *uem = (path.parent / field for field in fields)
            found.append((Path(fields[0]).with_suffix("").as_posix(), audio, rttm, uem[0] if uem else None))
    if not found:
        raise NanodrzError(f"recordings: {path}: holds no audio files" if path.is_dir()
                           else f"recordings: {path}: lists no recordings")
    repeated = sorted(name for name, count in Counter(name for name, *_ in found).items() if count > 1)
    if repeated:
        raise NanodrzError(f"recordings: {repeated[0]} appears twice (two audio files with one stem?)")
    return found


def _entries_of(table: dict, path: Path, stem: str, what: str) -> list:
    """The entries of a per-recording file: its only file id's, or the stem's."""
    if len(table) <= 1:
        return next(iter(table.values()), [])
    if stem not in table:
        raise NanodrzError(f"recordings: {path}: {what} holds several file ids and none is {stem!r}")
    return table[stem]


def _check_ends(ends: Sequence[float], duration: float, tolerance: float, path: Path | str, what: str,
                audio: Path) -> None:
    late = max(ends, default=0.0)
    if late > duration + tolerance:
        raise NanodrzError(f"recordings: {path}: a {what} ends at {late:.3f} s, past the end of {audio.name} "
                           f"({duration:.3f} s)")


def load_recording(name: str, audio: Path, rttm: Path | None, uem: Path | None, shared_uem: Uem | None,
                   shared_uem_path: str | None = None, tolerance: float = 0.01) -> Recording:
    """Read and check one recording's reference. Times may pass the end of the audio by `tolerance`
    seconds (RTTM times are rounded) and are clipped there; further is an error."""
    if rttm is None:
        raise NanodrzError(f"recordings: {audio}: no RTTM reference {audio.with_suffix('.rttm').name} next to it")
    if not audio.is_file():
        raise NanodrzError(f"recordings: {audio}: no such audio file")
    try:
        info = sf.info(str(audio))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NanodrzError(f"recordings: {audio}: cannot read audio ({reason})") from None
    if info.frames <= 0:
        raise NanodrzError(f"recordings: {audio}: the audio is empty")
    duration = info.frames / info.samplerate
    stem = Path(name).name
    by_file_id = read_rttm(rttm)
    turns = _entries_of(by_file_id, rttm, stem, "RTTM")
    file_id = next(iter(by_file_id)) if len(by_file_id) == 1 else stem
    _check_ends([t.end for t in turns], duration, tolerance, rttm, "RTTM turn", audio)
    if uem is not None:
        spans = _entries_of(read_uem(uem), uem, stem, "UEM")
        _check_ends([end for _, end in spans], duration, tolerance, uem, "UEM stretch", audio)
    elif shared_uem is not None and file_id in shared_uem:
        spans = shared_uem[file_id]
        _check_ends([end for _, end in spans], duration, tolerance, shared_uem_path, f"UEM stretch of {file_id}",
                    audio)
    else:
        spans = [(0.0, duration)]
    turns = [Turn(t.start, min(t.end, duration), t.speaker) for t in turns if t.start < duration]
    regions: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        end = min(end, duration)
        if regions and start <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(regions[-1][1], end))
        elif end > start:
            regions.append((start, end))
    return Recording(name, file_id, audio, tuple(turns), tuple(regions))


def split_recordings(recordings: Sequence[Recording], fraction: float, seed: int
                     ) -> tuple[list[Recording], list[Recording]]:
    """(training, held out): round(fraction * count) whole recordings (at least one when fraction > 0),
    the first by a hash of (seed, name), so adding recordings moves few of the others."""
    if fraction == 0.0:
        return list(recordings), []
    count = min(len(recordings), max(1, round(fraction * len(recordings))))
    order = sorted(recordings, key=lambda r: hashlib.sha256(f"{seed}:{r.name}".encode()).hexdigest())
    held_out = {recording.name for recording in order[:count]}
    return ([r for r in recordings if r.name not in held_out], [r for r in recordings if r.name in held_out])


@dataclass
class RecordingData:
    """A checked source, split: the training stream's part and the held-out recordings."""

    source: RecordingSource
    training: list[Recording]
    held_out: list[Recording]

    def describe(self) -> str:
        def minutes(recordings: list[Recording]) -> str:
            return f"{sum(r.annotated_seconds for r in recordings) / 60:.1f} min"

        return (f"recordings: {len(self.training)} ({minutes(self.training)}) for training at ratio "
                f"{self.source.ratio:g}, {len(self.held_out)} ({minutes(self.held_out)}) held out for validation")


def load_recordings(config: RecordingsConfig, max_speakers: int) -> RecordingData:
    """Find, read and check every recording, then split them; any problem is a one-line NanodrzError."""
    shared_uem = read_uem(config.uem) if config.uem else None
    recordings = [load_recording(*found, shared_uem, config.uem) for found in find_recordings(Path(config.path))]
    if shared_uem is not None and not {recording.file_id for recording in recordings} & set(shared_uem):
        raise NanodrzError(f"recordings: UEM {config.uem} names none of the recordings in {config.path}")
    for recording in recordings:
        for conversation in conversations(recording):
            speakers = len({turn.speaker for turn in conversation.turns})
            if speakers > max_speakers:
                raise NanodrzError(f"recordings: {recording.audio} has {speakers} speakers in one annotated stretch "
                                   f"but the tokenizer has {max_speakers}: raise tokenizer.num_speakers, or cut it "
                                   "into stretches with a UEM")
    if not any(recording.turns for recording in recordings):
        raise NanodrzError(f"recordings: {config.path}: no RTTM holds a single turn")
    training, held_out = split_recordings(recordings, config.validation_fraction, config.seed)
    if config.ratio > 0 and not training:
        raise NanodrzError(f"recordings: validation_fraction {config.validation_fraction:g} holds out all "
                           f"{len(recordings)} recording(s) and leaves none for training; lower it or set it to 0")
    return RecordingData(RecordingSource(training, config.ratio), training, held_out)
