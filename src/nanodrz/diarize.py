"""Diarize recordings of any length: chunks, speaker prompts, stitching, enrollment; `nanodrz diarize`.

A recording is cut into consecutive chunks as long as the longest chunk the model was trained on.
Every chunk after the first is preceded by a prompt: a clip of each speaker known so far (its clearest
single-speaker stretch from any earlier chunk), 200 ms of silence between clips, and the prompt
triples that letter them, so the model writes the same letter for the same voice (the layout is
`examples.assemble_prompted_input`, shared with training). Turns that cross a chunk boundary are
joined. Audio is read in chunk-sized blocks and only one clip per speaker is kept, so memory stays
bounded for recordings of hours.

When more speakers are known than the prompt has room for (the model's input length minus the
chunk, at most the number of prompt clips seen in training), clips are first shortened down to the
shortest clip seen in training; beyond that, the speakers heard most recently are prompted. A speaker
left out who speaks again gets a new label for now; at the end, labels whose voices match are merged
(`relabel`), which also brings back voices the model failed to match to their prompt clip, and
single-speaker stretches are re-labelled by voice. The voices are the model's own window speaker
embeddings, computed again on the recording's audio alone (no prompt clips) in blocks of a minute.

Enrollment (`--enroll NAME=clip.wav`) puts named clips in the prompt from the first chunk on, so those
voices come out under their names; other voices get letters A, B, ... by first appearance.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr
import torch
from pyannote.core import Annotation
from tqdm import tqdm

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE, load_audio, to_mono, waveform_audio
from nanodrz.checkpoint import build_model, load_checkpoint
from nanodrz.decoding import DecodingOptions, decode
from nanodrz.errors import NanodrzError
from nanodrz.examples import PROMPT_GAP_SECONDS, assemble_prompted_input, single_speaker_stretches
from nanodrz.fileio import check_writable_folder
from nanodrz.model import DiarizationModel
from nanodrz.outputs import DiarizeOutput, diarize_output, exclusive, parse_formats, write_outputs
from nanodrz.resegment import (NONSPEECH_THRESHOLD, OVERLAP_EVIDENCE_SECONDS, OVERLAP_THRESHOLD, SPEECH_THRESHOLD,
                               CountTrack, overlapped_seconds, remove_silence, resegment)
from nanodrz.segmentation import powerset_counts
from nanodrz.relabel import (DOMINANT_SHARE, MERGE_THRESHOLD, MIN_LABEL_SECONDS, REFINE_PASSES, SAME_VOICE_COSINE,
                             TWO_VOICE_COSINE, TWO_VOICE_SECONDS, WINDOW_SECONDS, VoiceTrack, absorb_small_labels,
                             dominant_label_voices, merge_by_voice, refine_labels, split_dominant_label)

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
MIN_SECONDS = 0.5
SILENCE_DBFS = -60.0
# Speaker embeddings are computed over blocks this long: CAM++ normalises over its whole input, and
# a longer input gives steadier voices (validation DER after re-labelling: 15 s 21.9%, 60 s 21.3%).
VOICE_BLOCK_SECONDS = 60.0
SHIPPED_MODEL = Path(__file__).parent / "models" / "default.safetensors"
# (samples,) 16 kHz audio -> (positions, E) unit speaker embeddings, position t at t / frame_rate seconds.
VoiceFunction = Callable[[np.ndarray], np.ndarray]
# (samples,) 16 kHz audio -> (positions, 3) probabilities of no, one, two or more speakers, same positions.
CountFunction = Callable[[np.ndarray], np.ndarray]
# (recording name, seconds of it read so far, its length in seconds): called as each chunk is read.
ProgressHook = Callable[[str, float, float], None]
# A path, 16 kHz mono samples, or pyannote's in-memory {"waveform": (channels, samples), "sample_rate": Hz}.
AudioSource = str | Path | np.ndarray | Mapping[str, object]


@dataclass
class DiarizationSettings:
    """What a user can ask of one run. Speaker counts are over the whole recording."""

    num_speakers: int | None = None
    min_speakers: int = 0
    max_speakers: int | None = None
    exclusive: bool = False
    merge_threshold: float = MERGE_THRESHOLD
    refine_passes: int = REFINE_PASSES
    speech_threshold: float | None = SPEECH_THRESHOLD
    overlap_threshold: float | None = OVERLAP_THRESHOLD
    nonspeech_threshold: float | None = NONSPEECH_THRESHOLD
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def __post_init__(self):
        if self.refine_passes < 0:
            raise NanodrzError(f"--refine-passes must be 0 (off) or more, got {self.refine_passes}")
        for name, value in (("speech", self.speech_threshold), ("overlap", self.overlap_threshold),
                            ("nonspeech", self.nonspeech_threshold)):
            if value is not None and not 0.0 < value <= 1.0:
                raise NanodrzError(f"--{name}-threshold is a probability in (0, 1] (or off), got {value:g}")
        if not self.merge_threshold >= -1.0:
            raise NanodrzError(f"--merge-threshold is a cosine similarity (at least -1, or off), "
                               f"got {self.merge_threshold:g}")
        if self.num_speakers is not None:
            if self.num_speakers < 1:
                raise NanodrzError("--num-speakers must be at least 1")
            self.min_speakers = self.max_speakers = self.num_speakers
        if self.min_speakers < 0 or (self.max_speakers is not None and self.max_speakers < 1):
            raise NanodrzError("speaker counts must be positive")
        if self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise NanodrzError(f"--min-speakers {self.min_speakers} is more than --max-speakers {self.max_speakers}")


@dataclass
class PromptGeometry:
    """Chunk and prompt sizes the model was trained with (seconds)."""

    chunk_seconds: float
    max_input_seconds: float
    clip_seconds: tuple[float, float]
    max_prompt_speakers: int
    time_resolution: float

    @classmethod
    def of(cls, model: DiarizationModel, training_config: dict) -> "PromptGeometry":
        examples = training_config.get("data", {}).get("examples", {})
        tok = model.tokenizer.config
        chunk = float(examples.get("chunk_seconds", (8.0, 15.0))[1])
        clips = tuple(float(x) for x in examples.get("prompt_clip_seconds", (1.5, 4.0)))
        # Leave room for at least one prompt clip, or labels could not carry across chunks.
        room = clips[0] + PROMPT_GAP_SECONDS
        if tok.max_seconds - room < 1.0:
            raise NanodrzError(f"the model's {tok.max_seconds:g} s input has no room for a chunk and a prompt clip")
        return cls(
            chunk_seconds=min(chunk, tok.max_seconds - room),
            max_input_seconds=tok.max_seconds,
            clip_seconds=clips,
            # Keep one letter free for a voice not heard before.
            max_prompt_speakers=min(int(examples.get("max_prompt_speakers", 4)), tok.num_speakers - 1),
            time_resolution=tok.time_resolution,
        )


@dataclass
class KnownSpeaker:
    """A voice met so far: its output label, its best clip, and when it last spoke."""

    label: str
    clip: np.ndarray
    clip_quality: float
    last_active: float = -1.0
    speech_seconds: float = 0.0
    enrolled: bool = False


def iter_chunks(source: str | Path | np.ndarray, chunk_seconds: float) -> Iterator[np.ndarray]:
    """16 kHz mono chunks of `chunk_seconds` (the last one shorter), read block by block from disk."""
    chunk = int(round(chunk_seconds * SAMPLE_RATE))
    if isinstance(source, np.ndarray):
        for start in range(0, len(source), chunk):
            yield source[start:start + chunk]
        return
    with sf.SoundFile(str(source)) as handle:
        rate = handle.samplerate
        resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        block = max(1, int(chunk_seconds * rate))
        pending = np.zeros(0, dtype=np.float32)
        while True:
            data = handle.read(block, dtype="float32", always_2d=True)
            last = len(data) < block
            mono = to_mono(data) if data.shape[1] > 1 else data[:, 0]
            if resampler is not None:
                mono = resampler.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32), last=last)
            pending = np.concatenate([pending, mono.astype(np.float32)])
            while len(pending) >= chunk:
                yield pending[:chunk]
                pending = pending[chunk:]
            if last:
                break
        if len(pending):
            yield pending


def reading_error(name: str | Path, error: Exception) -> NanodrzError:
    """Any failure of the audio library (or the disk) on one file, as that file's one-line error."""
    if isinstance(error, NanodrzError):
        return error
    reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    return NanodrzError(f"{name}: cannot read audio ({reason})")


def check_audio_file(path: Path) -> float:
    """Duration of a readable audio file; one-line errors for unreadable, empty or too short files.

    Only regular files are opened: a named pipe or a device would block the whole call or never end.
    """
    if not path.is_file():
        raise NanodrzError(f"{path}: not a regular file (pipes, devices and folders are not audio files)")
    try:
        info = sf.info(str(path))
    except Exception as error:  # libsndfile and the OS fail in many ways on hostile files
        raise reading_error(path, error) from None
    if info.frames <= 0:
        raise NanodrzError(f"{path}: empty audio file")
    duration = info.frames / info.samplerate
    if duration < MIN_SECONDS:
        raise NanodrzError(f"{path}: only {duration:.2f} s of audio; at least {MIN_SECONDS} s is needed")
    return duration


def check_chunk(chunk: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(chunk)):
        raise NanodrzError(f"{name}: audio contains NaN or infinite samples")


@dataclass
class ChunkOutputs:
    """What a recording's chunks leave behind for `finish_turns`, kept so that post-processing can be
    replayed under other settings without decoding again (`Diarizer.chunk_outputs_many`)."""

    turns: list[Turn]
    scores: list[float]
    voices: VoiceTrack | None
    counts: CountTrack | None
    named: frozenset[str]
    time_resolution: float
    segmentation: CountTrack | None = None

    def finish(self, settings: DiarizationSettings) -> list[Turn]:
        """The recording's final turns under `settings`, as `nanodrz diarize` gives them."""
        turns, scores = self.scored_turns(settings)
        return exclusive(turns, scores) if settings.exclusive else turns

    def scored_turns(self, settings: DiarizationSettings) -> tuple[list[Turn], list[float]]:
        """The final turns before `--exclusive`, with the model's confidence in each."""
        return finish_turns(self.turns, self.scores, self.voices, self.counts, settings, self.named,
                            self.time_resolution, self.segmentation)


class RecordingState:
    """Long-form progress through one recording: known speakers, turns so far, the chunk stream."""

    def __init__(self, name: str, source: str | Path | np.ndarray, geometry: PromptGeometry,
                 settings: DiarizationSettings, enrolled: dict[str, np.ndarray], seconds: float,
                 progress: bool = False, on_progress: ProgressHook | None = None):
        self.name = name
        self.where = name if isinstance(source, np.ndarray) else str(source)  # what error messages name
        self.geometry = geometry
        self.settings = settings
        # One bar per recording, on terminals only: an hour of audio takes minutes.
        self.bar = tqdm(total=round(seconds, 1), unit="s", desc=name, leave=False, file=sys.stderr,
                        disable=None if progress else True)
        self.on_progress = on_progress
        self.seconds = seconds
        self.seconds_read = 0.0
        self.chunks = iter_chunks(source, geometry.chunk_seconds)
        self.upcoming = next(self.chunks, None)
        self.offset = 0.0
        self.turns: list[Turn] = []
        self.scores: list[float] = []
        self.known: list[KnownSpeaker] = [
            KnownSpeaker(name, clip[: int(geometry.clip_seconds[1] * SAMPLE_RATE)], float("inf"), enrolled=True)
            for name, clip in enrolled.items()
        ]
        self.unnamed = 0
        self.loudest = -np.inf
        self.current: np.ndarray | None = None
        self.prompted: list[KnownSpeaker] = []
        self.prompt_seconds = 0.0
        self.track: VoiceTrack | None = None
        self.counts: CountTrack | None = None
        self.segmentation: CountTrack | None = None
        self.unvoiced: list[np.ndarray] = []  # chunks still waiting for their speaker embeddings
        self.previous_tail = np.zeros(0, dtype=np.float32)
        self.done = False

    def next_input(self) -> tuple[np.ndarray, list[Turn]] | None:
        """The next model input (prompt + chunk) and its prompt turns, or None at the end."""
        chunk, self.upcoming = self.upcoming, (next(self.chunks, None) if self.upcoming is not None else None)
        if chunk is None:
            self.close()
            return None
        self.bar.update(round(len(chunk) / SAMPLE_RATE, 1))
        self.seconds_read += len(chunk) / SAMPLE_RATE
        check_chunk(chunk, self.where)
        if len(chunk):
            self.loudest = max(self.loudest, 10 * np.log10(float(np.max(chunk ** 2)) + 1e-12))
        self.current = chunk
        self.prompted, clip_seconds = self._choose_prompt(len(chunk) / SAMPLE_RATE)
        clips = [speaker.clip[: int(clip_seconds * SAMPLE_RATE)] for speaker in self.prompted]
        audio, prompt = assemble_prompted_input(clips, chunk, PROMPT_GAP_SECONDS)
        self.prompt_seconds = (len(audio) - len(chunk)) / SAMPLE_RATE
        return audio, prompt

    def report_progress(self) -> None:
        """Tell the progress hook how far reading has come; the last chunk reports the whole length
        (resampling can leave the count of samples read a fraction of a sample off)."""
        if self.on_progress is not None:
            done = self.seconds if self.upcoming is None else min(self.seconds_read, self.seconds)
            self.on_progress(self.name, done, self.seconds)

    def close(self) -> None:
        """Stop reading: the file is closed and the bar removed."""
        self.done = True
        self.chunks.close()
        self.bar.close()

    def _choose_prompt(self, chunk_seconds: float) -> tuple[list[KnownSpeaker], float]:
        geometry = self.geometry
        if not self.known:
            return [], 0.0
        budget = geometry.max_input_seconds - chunk_seconds
        shortest, longest = geometry.clip_seconds
        fits = int(budget // (shortest + PROMPT_GAP_SECONDS))
        slots = min(fits, geometry.max_prompt_speakers, len(self.known))
        if slots <= 0:
            return [], 0.0
        ranked = sorted(self.known, key=lambda s: (s.enrolled, s.last_active, s.speech_seconds), reverse=True)
        chosen = ranked[:slots]
        clip_seconds = min(longest, budget / len(chosen) - PROMPT_GAP_SECONDS)
        return chosen, max(shortest, clip_seconds)

    def decoding_options(self) -> DecodingOptions:
        """Per-chunk speaker caps derived from the recording-level settings (a minimum count is
        enforced on the last chunk, when every earlier chunk has had its say)."""
        settings = self.settings
        is_last_chunk = self.upcoming is None
        options = DecodingOptions(**{**settings.decoding.__dict__})
        if settings.max_speakers is not None:
            room = max(0, settings.max_speakers - len(self.known))
            options.max_speakers = max(1, len(self.prompted) + room)
        if is_last_chunk and settings.min_speakers:
            missing = max(0, settings.min_speakers - len(self.known))
            options.min_speakers = len(self.prompted) + missing
        return options

    def absorb(self, turns: Sequence[Turn], scores: Sequence[float], speaker_counts: np.ndarray | None = None,
               frame_rate: float = 25.0) -> None:
        """Map a chunk's letters to recording labels, shift times, and update speaker clips; keep the
        chunk's part of the overlap head's `speaker_counts` (input frames, 3) if given."""
        chunk = self.current
        chunk_seconds = len(chunk) / SAMPLE_RATE
        if speaker_counts is not None:
            first = int(round(self.prompt_seconds * frame_rate))
            self.counts = self.counts or CountTrack(frame_rate)
            self.counts.add(speaker_counts[first:first + int(round(chunk_seconds * frame_rate))], self.offset)
        by_letter = {chr(ord("A") + i): speaker for i, speaker in enumerate(self.prompted)}
        local: list[Turn] = []
        for turn, score in zip(turns, scores):
            speaker = by_letter.get(turn.speaker)
            if speaker is None:
                speaker = self._new_speaker()
                by_letter[turn.speaker] = speaker
            start = min(max(turn.start - self.prompt_seconds, 0.0), chunk_seconds)
            end = min(max(turn.end - self.prompt_seconds, 0.0), chunk_seconds)
            if end <= start:
                continue
            local.append(Turn(start, end, speaker.label))
            self.scores.append(float(score))
            speaker.last_active = max(speaker.last_active, self.offset + end)
            speaker.speech_seconds += end - start
        self._update_clips(local, chunk)
        self.turns += [Turn(self.offset + t.start, self.offset + t.end, t.speaker) for t in local]
        self.offset += chunk_seconds

    def add_segmentation(self, count_function: CountFunction, frame_rate: float) -> None:
        """The current chunk's segmentation-3.0 speaker counts, on the chunk alone (no prompt clips);
        call before `absorb`, which moves the offset past the chunk."""
        self.segmentation = self.segmentation or CountTrack(frame_rate)
        self.segmentation.add(count_function(self.current), self.offset)

    def add_voices(self, voice_function: VoiceFunction, frame_rate: float) -> None:
        """Queue the current chunk for the recording's voice track; every `VOICE_BLOCK_SECONDS`, and at
        the end, embed the queued audio in one go, with half a window of its neighbours' audio on each
        side so that no block edge blurs the voices."""
        self.unvoiced.append(self.current)
        block = np.concatenate(self.unvoiced)
        if len(block) < VOICE_BLOCK_SECONDS * SAMPLE_RATE and self.upcoming is not None:
            return
        context = int(WINDOW_SECONDS / 2 * SAMPLE_RATE)
        following = self.upcoming[:context] if self.upcoming is not None else np.zeros(0, dtype=np.float32)
        audio = np.concatenate([self.previous_tail, block, following]).astype(np.float32)
        self.track = self.track or VoiceTrack(frame_rate)
        self.track.add(voice_function(audio), len(self.previous_tail) / SAMPLE_RATE, len(block) / SAMPLE_RATE)
        self.previous_tail = block[-context:]
        self.unvoiced = []

    def _new_speaker(self) -> KnownSpeaker:
        taken = {speaker.label for speaker in self.known}
        label = letter_label(self.unnamed)
        while label in taken:
            self.unnamed += 1
            label = letter_label(self.unnamed)
        self.unnamed += 1
        speaker = KnownSpeaker(label, np.zeros(0, dtype=np.float32), 0.0)
        self.known.append(speaker)
        return speaker

    def _update_clips(self, local: list[Turn], chunk: np.ndarray) -> None:
        longest = self.geometry.clip_seconds[1]
        for speaker in self.known:
            if speaker.enrolled:
                continue
            for start, end in single_speaker_stretches(local, speaker.label):
                # Keep away from the stretch edges, where the boundary estimate is least sure.
                margin = min(0.1, (end - start) / 4)
                start, end = start + margin, end - margin
                quality = min(end - start, longest)
                if quality > speaker.clip_quality:
                    begin = int(start * SAMPLE_RATE)
                    speaker.clip = chunk[begin: begin + int(quality * SAMPLE_RATE)].copy()
                    speaker.clip_quality = quality

    def chunk_outputs(self) -> ChunkOutputs:
        named = frozenset(speaker.label for speaker in self.known if speaker.enrolled)
        if self.loudest < SILENCE_DBFS:  # digital silence: nobody speaks, whatever the decoder wrote
            return ChunkOutputs([], [], None, None, named, self.geometry.time_resolution)
        return ChunkOutputs(list(self.turns), list(self.scores), self.track, self.counts, named,
                            self.geometry.time_resolution, self.segmentation)


def finish_turns(turns: Sequence[Turn], scores: Sequence[float], voices: VoiceTrack | None, counts: CountTrack | None,
                 settings: DiarizationSettings, named: frozenset[str], time_resolution: float,
                 segmentation: CountTrack | None = None) -> tuple[list[Turn], list[float]]:
    """A whole recording's stitched chunk turns -> its final turns: labels merged and re-decided by
    voice (`relabel`), resegmented by the overlap head (`resegment`), cut where segmentation-3.0 hears
    no speech, stitched, renamed. A pure function of what the chunks left behind, so benchmarks can
    replay it under other settings."""
    turns, scores = list(turns), list(scores)
    count_array = counts.array() if counts is not None else None
    if voices is not None:
        track = voices.array()
        turns = merge_by_voice(turns, track, voices.frame_rate, settings.merge_threshold,
                               settings.min_speakers, settings.max_speakers, named)
        if settings.refine_passes:
            turns, scores = refine_labels(turns, scores, track, voices.frame_rate, settings.refine_passes,
                                          threshold=settings.merge_threshold, min_speakers=settings.min_speakers,
                                          max_speakers=settings.max_speakers, named=named)
            if one_voice_heard_as_two(turns, track, voices.frame_rate, count_array,
                                      counts.frame_rate if counts else 0.0, settings):
                turns, scores = split_dominant_label(turns, scores, track, voices.frame_rate,
                                                     settings.max_speakers, named)
            turns = absorb_small_labels(turns, track, voices.frame_rate, MIN_LABEL_SECONDS, settings.min_speakers,
                                        named)
    if counts is not None:
        turns, scores = resegment(turns, scores, count_array, counts.frame_rate, settings.speech_threshold,
                                  settings.overlap_threshold)
    if segmentation is not None and settings.nonspeech_threshold is not None:
        turns, scores = remove_silence(turns, scores, segmentation.array(), segmentation.frame_rate,
                                       settings.nonspeech_threshold)
    turns, scores = stitch(turns, scores, 2 * time_resolution)
    # A turn shorter than two time bins is an artefact (e.g. a turn started in a chunk's last bin).
    kept = [i for i, turn in enumerate(turns) if turn.end - turn.start >= 2 * time_resolution - 1e-9]
    return rename_by_first_turn([turns[i] for i in kept], named), [scores[i] for i in kept]


def one_voice_heard_as_two(turns: Sequence[Turn], track: np.ndarray, voice_rate: float, counts: np.ndarray | None,
                           count_rate: float, settings: DiarizationSettings) -> bool:
    """One label carries at least `DOMINANT_SHARE` of the written speech (and more than one speaker is
    allowed), and either its voice blocks fall into two clearly different voices (cosine below
    `TWO_VOICE_COSINE`, the smaller at least `TWO_VOICE_SECONDS` long), or the overlap head's `counts`
    are sure of at least `OVERLAP_EVIDENCE_SECONDS` of two voices at once and the two voices are not
    near copies (cosine below `SAME_VOICE_COSINE`: the head also hears "overlap" in some monologues)."""
    if settings.max_speakers == 1:
        return False
    found = dominant_label_voices(turns, track, voice_rate)
    if found is None or found[1] < DOMINANT_SHARE:
        return False
    _, _, similarity, smaller = found
    if similarity < TWO_VOICE_COSINE and smaller >= TWO_VOICE_SECONDS:
        return True
    threshold = settings.overlap_threshold
    heard = counts is not None and threshold is not None and overlapped_seconds(
        counts, count_rate, threshold) >= OVERLAP_EVIDENCE_SECONDS
    return heard and similarity < SAME_VOICE_COSINE


def rename_by_first_turn(turns: Sequence[Turn], named: frozenset[str]) -> list[Turn]:
    """Unnamed labels renamed A, B, ... in order of their first turn (names in `named` are kept and
    never reused), so merged labels leave no gaps."""
    names: dict[str, str] = {}
    index = 0
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        if turn.speaker in named or turn.speaker in names:
            continue
        while letter_label(index) in named:
            index += 1
        names[turn.speaker] = letter_label(index)
        index += 1
    return [Turn(t.start, t.end, names.get(t.speaker, t.speaker)) for t in turns]


def letter_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ... for unnamed speakers."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def stitch(turns: Sequence[Turn], scores: Sequence[float], gap: float) -> tuple[list[Turn], list[float]]:
    """Join same-speaker turns that overlap or are less than `gap` apart (e.g. cut by a chunk boundary)."""
    merged: list[Turn] = []
    merged_scores: list[float] = []
    last_of: dict[str, int] = {}
    for turn, score in sorted(zip(turns, scores), key=lambda pair: (pair[0].start, pair[0].end)):
        index = last_of.get(turn.speaker)
        if index is not None and turn.start - merged[index].end < gap:
            previous = merged[index]
            merged[index] = Turn(previous.start, max(previous.end, turn.end), turn.speaker)
            merged_scores[index] = max(merged_scores[index], score)
            continue
        last_of[turn.speaker] = len(merged)
        merged.append(turn)
        merged_scores.append(score)
    order = sorted(range(len(merged)), key=lambda i: (merged[i].start, merged[i].end, merged[i].speaker))
    return [merged[i] for i in order], [merged_scores[i] for i in order]


class Diarizer:
    """A loaded model, ready to diarize paths or arrays (load once, call many times).

    >>> diarizer = Diarizer.from_pretrained()
    >>> annotation = diarizer("meeting.wav")
    """

    def __init__(self, model: DiarizationModel, training_config: dict | None = None, decode_fn=decode,
                 voice_function: VoiceFunction | None = None):
        self.model = model.eval()
        self.geometry = PromptGeometry.of(model, training_config or {})
        self.decode_fn = decode_fn
        self.voice_function = voice_function or model_voice_function(model)
        self.count_function = model_count_function(model)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> "Diarizer":
        """Load a checkpoint (default: the model shipped inside the package)."""
        path = Path(path) if path is not None else SHIPPED_MODEL
        if path == SHIPPED_MODEL and not path.is_file():
            raise NanodrzError("no model is shipped in this installation; pass --model PATH to a trained checkpoint")
        try:
            torch_device = torch.device(device)
        except RuntimeError:
            raise NanodrzError(f"unknown device {device!r}") from None
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise NanodrzError("--device cuda was asked for but no CUDA GPU is available")
        checkpoint = load_checkpoint(path)
        return cls(build_model(checkpoint).to(torch_device), checkpoint.config)

    def __call__(self, audio: AudioSource, settings: DiarizationSettings | None = None,
                 enroll: dict[str, str | Path | np.ndarray] | None = None, uri: str | None = None) -> Annotation:
        """Diarize one recording into a pyannote Annotation (`run(...).speaker_diarization`)."""
        return self.run(audio, settings, enroll, uri).speaker_diarization

    def run(self, audio: AudioSource, settings: DiarizationSettings | None = None,
            enroll: dict[str, str | Path | np.ndarray] | None = None, uri: str | None = None,
            on_progress: ProgressHook | None = None) -> DiarizeOutput:
        """Diarize one recording (a path, 16 kHz mono samples, or pyannote's in-memory
        {"waveform": ..., "sample_rate": ...}) into regular and exclusive diarizations and one speaker
        embedding per label, as pyannote.audio 4 pipelines return them."""
        name = uri or recording_name(audio)
        [(_, outcome)] = self.outputs_many([(name, audio)], settings, enroll, batch_size=1, on_progress=on_progress)
        if isinstance(outcome, NanodrzError):
            raise outcome
        return outcome

    def diarize_many(self, recordings: Sequence[tuple[str, AudioSource]],
                     settings: DiarizationSettings | None = None,
                     enroll: dict[str, str | Path | np.ndarray] | None = None,
                     batch_size: int = 8, progress: bool = False) -> Iterator[tuple[str, list[Turn] | NanodrzError]]:
        """Diarize many recordings, batching the current chunk of up to `batch_size` recordings together.

        Yields (name, turns) per recording in input order, or (name, NanodrzError) for a recording that
        could not be processed; one bad file never stops the others.
        """
        for name, outcome in self.outputs_many(recordings, settings, enroll, batch_size, progress):
            yield name, outcome if isinstance(outcome, NanodrzError) else list(outcome.turns)

    def outputs_many(self, recordings: Sequence[tuple[str, AudioSource]],
                     settings: DiarizationSettings | None = None,
                     enroll: dict[str, str | Path | np.ndarray] | None = None, batch_size: int = 8,
                     progress: bool = False, on_progress: ProgressHook | None = None
                     ) -> Iterator[tuple[str, DiarizeOutput | NanodrzError]]:
        """`diarize_many` with a `DiarizeOutput` per recording; `on_progress` is called as each chunk
        of each recording is read."""
        yield from self._process(recordings, settings, enroll, batch_size, progress, self._output, on_progress)

    def chunk_outputs_many(self, recordings: Sequence[tuple[str, AudioSource]],
                           settings: DiarizationSettings | None = None, batch_size: int = 8, progress: bool = False
                           ) -> Iterator[tuple[str, ChunkOutputs | NanodrzError]]:
        """`diarize_many` stopped before post-processing: (name, ChunkOutputs) per recording, whose
        `finish(settings)` gives the turns under any post-processing settings (the decoding settings,
        speaker caps included, are `settings`'s). For benchmarks that tune post-processing."""
        yield from self._process(recordings, settings, None, batch_size, progress, RecordingState.chunk_outputs)

    def _process(self, recordings: Sequence[tuple[str, AudioSource]], settings: DiarizationSettings | None,
                 enroll: dict[str, str | Path | np.ndarray] | None, batch_size: int, progress: bool,
                 finish: Callable[[RecordingState], object], on_progress: ProgressHook | None = None
                 ) -> Iterator[tuple[str, object]]:
        settings = settings or DiarizationSettings()
        if batch_size < 1:
            raise NanodrzError("--batch-size must be at least 1")
        enrolled = {name: enrollment_clip(name, clip) for name, clip in (enroll or {}).items()}
        if len(enrolled) > self.geometry.max_prompt_speakers:
            raise NanodrzError(f"at most {self.geometry.max_prompt_speakers} enrolled speakers fit in this model's prompt")
        bar = tqdm(total=len(recordings), unit="file", disable=not progress, file=sys.stderr)
        for first in range(0, len(recordings), batch_size):
            group = recordings[first:first + batch_size]
            outcomes: dict[str, list[Turn] | NanodrzError] = {}
            states: list[RecordingState] = []
            for name, source in group:
                try:
                    if isinstance(source, Mapping):
                        source = in_memory_audio(name, source)
                    if not isinstance(source, np.ndarray):
                        seconds = check_audio_file(Path(source))
                    elif len(source) < MIN_SECONDS * SAMPLE_RATE:
                        raise NanodrzError(f"{name}: shorter than {MIN_SECONDS} s")
                    else:
                        seconds = len(source) / SAMPLE_RATE
                    states.append(RecordingState(name, source, self.geometry, settings, enrolled, seconds, progress,
                                                 on_progress))
                except Exception as error:  # the first block is read here: a corrupt file fails alone
                    outcomes[name] = reading_error(source if isinstance(source, (str, Path)) else name, error)
            self._run(states, outcomes, finish)
            for name, _ in group:
                bar.update(1)
                yield name, outcomes[name]
        bar.close()

    def _run(self, states: list[RecordingState], outcomes: dict[str, object],
             finish: Callable[[RecordingState], object]) -> None:
        active = list(states)
        while active:
            inputs, ready = [], []
            for state in active:
                try:
                    item = state.next_input()
                except Exception as error:  # a file corrupt further in fails alone, with what it has
                    outcomes[state.name] = reading_error(state.where, error)
                    state.close()
                    continue
                if item is None:
                    try:
                        outcomes[state.name] = finish(state)
                    except NanodrzError as error:
                        outcomes[state.name] = error
                    continue
                state.report_progress()
                inputs.append(item)
                ready.append(state)
            active = [state for state in ready if not state.done]
            if not ready:
                break
            # Items of one batch share decoding options; group by them (usually all equal).
            groups: dict[str, list[int]] = {}
            options_of = [state.decoding_options() for state in ready]
            for index, options in enumerate(options_of):
                groups.setdefault(json.dumps(options.__dict__, sort_keys=True, default=str), []).append(index)
            for indices in groups.values():
                results = self.decode_fn(self.model, [inputs[i][0] for i in indices], [inputs[i][1] for i in indices],
                                 options_of[indices[0]])
                for i, result in zip(indices, results):
                    if self.count_function is not None:
                        ready[i].add_segmentation(self.count_function, self.model.config.frame_rate)
                    ready[i].absorb(result.turns, result.scores, result.speaker_counts, self.model.config.frame_rate)
                    if self.voice_function is not None:
                        ready[i].add_voices(self.voice_function, self.model.config.frame_rate)

    def _output(self, state: RecordingState) -> DiarizeOutput:
        turns, scores = state.chunk_outputs().scored_turns(state.settings)
        # The voice track, also of a silent recording, so its embeddings are (0, E) rather than missing.
        output = diarize_output(state.name, turns, scores, state.settings.exclusive, state.track)
        if state.settings.min_speakers and len(output.labels) < state.settings.min_speakers:
            print(f"nanodrz diarize: warning: {state.name}: found {len(output.labels)} speakers, "
                  f"fewer than the {state.settings.min_speakers} asked for", file=sys.stderr)
        return output


def recording_name(audio: AudioSource) -> str:
    """The name a recording gets when the caller gives none: a file's stem, an in-memory dict's "uri"."""
    if isinstance(audio, (str, Path)):
        return Path(audio).stem
    if isinstance(audio, Mapping):
        return str(audio.get("uri") or "audio")
    return "audio"


def in_memory_audio(name: str, audio: Mapping[str, object]) -> np.ndarray:
    """pyannote's {"waveform": (channels, samples), "sample_rate": Hz} as 16 kHz mono samples."""
    if "waveform" not in audio or "sample_rate" not in audio:
        raise NanodrzError(f"{name}: in-memory audio needs 'waveform' and 'sample_rate' keys, got {sorted(audio)}")
    return waveform_audio(name, audio["waveform"], audio["sample_rate"])


def model_voice_function(model: DiarizationModel) -> VoiceFunction | None:
    """The model front end's window speaker embeddings as a function of audio, if it computes them
    (front end `campplus_windows`); without them, labels are neither merged by voice nor re-labelled."""
    front_end = getattr(model, "front_end", None)
    if not hasattr(front_end, "voice_track"):
        return None
    device = next(model.parameters()).device

    def voices(audio: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return front_end.voice_track(torch.from_numpy(audio).to(device)).float().cpu().numpy()

    return voices


def model_count_function(model: DiarizationModel) -> CountFunction | None:
    """segmentation-3.0's speaker counts as a function of audio, if the model's front end runs it
    (`campplus_segmentation`); without them, speech is not cut where that network hears none."""
    front_end = getattr(model, "front_end", None)
    if not hasattr(front_end, "segment"):
        return None
    device = next(model.parameters()).device

    def counts(audio: np.ndarray) -> np.ndarray:
        samples = torch.from_numpy(np.ascontiguousarray(audio)).to(device)
        frames = int(front_end.num_frames(torch.tensor([len(audio)]))[0])
        return powerset_counts(front_end.segment(samples, frames).cpu().numpy())

    return counts


# --- command line ---------------------------------------------------------------------------------
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
        enroll[name] = enrollment_clip(name, clip)
    return enroll


def enrollment_clip(name: str, clip: str | Path | np.ndarray) -> np.ndarray:
    """A clip that can name a speaker: at least MIN_SECONDS long and not silent."""
    audio = np.asarray(clip if isinstance(clip, np.ndarray) else load_audio(clip), dtype=np.float32)
    if len(audio) < MIN_SECONDS * SAMPLE_RATE:
        raise NanodrzError(f"enrollment clip for {name!r} is shorter than {MIN_SECONDS} s")
    if not np.all(np.isfinite(audio)):
        raise NanodrzError(f"enrollment clip for {name!r} has NaN or infinite samples")
    if 20 * np.log10(float(np.max(np.abs(audio))) + 1e-12) < SILENCE_DBFS:
        raise NanodrzError(f"enrollment clip for {name!r} is silent (peak below {SILENCE_DBFS:g} dBFS): "
                           "no voice to recognise")
    return audio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="AUDIO_OR_DIR", help="audio files or directories")
    parser.add_argument("--out", type=Path, help="write the NAME.* files of --format and --plot here "
                        "(default: RTTM to stdout)")
    parser.add_argument("--format", default="rttm",
                        help="comma-separated output formats: rttm (NAME.rttm), exclusive-rttm (NAME.exclusive.rttm: "
                             "at most one speaker at a time), json (NAME.json), embeddings (NAME.embeddings.npz: "
                             "'labels' and one unit CAM++ speaker embedding per label in 'embeddings'; needs --out)")
    parser.add_argument("--plot", action="store_true", help="also write a timeline plot NAME.png")
    parser.add_argument("--model", type=Path, help="checkpoint .safetensors (default: the shipped model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="recordings decoded together")
    parser.add_argument("--num-speakers", type=int, help="exact number of speakers, when known")
    parser.add_argument("--min-speakers", type=int, default=0)
    parser.add_argument("--max-speakers", type=int)
    parser.add_argument("--exclusive", action="store_true", help="at most one speaker at a time (for ASR alignment)")
    parser.add_argument("--merge-threshold", type=merge_threshold_arg, default=MERGE_THRESHOLD, metavar="COSINE",
                        help="merge two labels whose voices (the model's speaker embeddings where each talks "
                             f"alone) have at least this cosine similarity (default {MERGE_THRESHOLD:g}; off = "
                             "merge only to honour --max-speakers)")
    parser.add_argument("--refine-passes", type=int, default=REFINE_PASSES, metavar="N",
                        help="rounds of re-labelling single-speaker stretches by voice, each followed by merging "
                             f"(default {REFINE_PASSES}; 0 = keep the labels the model wrote)")
    add_resegment_arguments(parser)
    parser.add_argument("--enroll", action="append", default=[], metavar="NAME=CLIP",
                        help="name a speaker from an enrollment clip (repeatable)")
    parser.add_argument("--decoding", choices=("greedy", "beam", "sample"), default="greedy")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0, help="seed for --decoding sample")
    parser.add_argument("--eos-penalty", type=float, default=DecodingOptions.eos_penalty, metavar="NATS",
                        help="subtracted from the end-of-answer logit: higher keeps the model writing turns "
                             f"(default {DecodingOptions.eos_penalty:g})")
    parser.add_argument("--snap", type=float, metavar="SECONDS",
                        help="move turn boundaries to the model's frame-level speaker activity within this reach "
                             f"(models with an activity head; default {DecodingOptions.snap_seconds:g}, 0 = off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch, per worker (default 1: small models decode token by token "
                             "fastest on one thread; raise it for large models)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, one model each (default 1); each takes whole groups of --batch-size "
                             "files, so the outputs are the same as with one")


def merge_threshold_arg(value: str) -> float:
    """A cosine, or "off" (never merge by similarity alone)."""
    if value.strip().lower() == "off":
        return float("inf")
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity or off, got {value!r}") from None


def add_resegment_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `resegment` for models with an overlap head (`nanodrz diarize` and `nanodrz sweep`)."""
    parser.add_argument("--speech-threshold", type=probability_arg, default=SPEECH_THRESHOLD, metavar="PROBABILITY",
                        help="cut written turns where the model's overlap head gives silence at least this "
                             "probability, and add the nearest speaker where it gives speech at least this and "
                             f"nothing is written (models with an overlap head; default {SPEECH_THRESHOLD:g}; "
                             "off = keep what the decoder wrote)")
    parser.add_argument("--overlap-threshold", type=probability_arg, default=OVERLAP_THRESHOLD, metavar="PROBABILITY",
                        help="add the nearest other speaker where the overlap head gives two or more speakers at "
                             f"least this probability and one is written (default {OVERLAP_THRESHOLD:g}; off)")
    parser.add_argument("--nonspeech-threshold", type=probability_arg, default=NONSPEECH_THRESHOLD,
                        metavar="PROBABILITY",
                        help="cut written turns where segmentation-3.0 gives no speech at least this probability "
                             "(models with the campplus_segmentation front end; default "
                             f"{'off' if NONSPEECH_THRESHOLD is None else f'{NONSPEECH_THRESHOLD:g}'}; off)")


def probability_arg(value: str) -> float | None:
    """A probability, or "off"."""
    if value.strip().lower() == "off":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability or off, got {value!r}") from None


def load_diarizer(model: Path | None, device: str, threads: int, formats: set[str]) -> Diarizer:
    """The diarizer of one process running `nanodrz diarize`, refusing formats its model cannot give."""
    torch.set_num_threads(threads)
    diarizer = Diarizer.from_pretrained(model, device)
    if "embeddings" in formats and diarizer.voice_function is None:
        raise NanodrzError("--format embeddings needs a model whose front end computes speaker embeddings "
                           "(campplus_windows or campplus_segmentation); this one does not")
    return diarizer


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format, args.out is not None)
    decoding = DecodingOptions(strategy=args.decoding, beam_size=args.beam_size, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, eos_penalty=args.eos_penalty,
                               **({} if args.snap is None else {"snap_seconds": args.snap}))
    settings = DiarizationSettings(num_speakers=args.num_speakers, min_speakers=args.min_speakers,
                                   max_speakers=args.max_speakers, exclusive=args.exclusive,
                                   merge_threshold=args.merge_threshold, refine_passes=args.refine_passes,
                                   speech_threshold=args.speech_threshold, overlap_threshold=args.overlap_threshold,
                                   nonspeech_threshold=args.nonspeech_threshold,
                                   decoding=decoding)
    if args.threads < 1 or args.batch_size < 1 or args.workers < 1:
        raise NanodrzError("--threads, --batch-size and --workers must be at least 1")
    if args.out is not None:
        check_writable_folder(args.out, "--out")
    found, errors = find_audio(args.inputs)
    check_distinct_outputs(found)
    enroll = parse_enrollment(args.enroll)
    if args.workers > 1:
        from nanodrz.parallel import WorkerJob, diarize_in_workers  # it imports this module

        job = WorkerJob(args.model, args.device, args.threads, args.batch_size, frozenset(formats), settings, enroll)
        outcomes = diarize_in_workers(found, job, args.workers, progress=len(found) > 1)
    else:
        diarizer = load_diarizer(args.model, args.device, args.threads, formats)
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
