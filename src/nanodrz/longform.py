"""Long-form diarization: a recording walked chunk by chunk, with speaker prompts.

A recording is cut into consecutive chunks as long as the longest chunk the model was trained on.
Every chunk after the first is preceded by a prompt: a clip of each speaker known so far (its clearest
single-speaker stretch from any earlier chunk), 200 ms of silence between clips, and the prompt
triples that letter them, so the model writes the same letter for the same voice (the layout is
`examples.assemble_prompted_input`, shared with training). Audio is read in chunk-sized blocks and only
one clip per speaker is kept, so memory stays bounded for recordings of hours.

When more speakers are known than the prompt has room for (the model's input length minus the chunk,
at most the number of prompt clips seen in training), clips are first shortened down to the shortest
clip seen in training; beyond that, the speakers heard most recently are prompted. A speaker left out
who speaks again gets a new label for now; `postprocess` merges labels whose voices match at the end.

Enrollment (`--enroll NAME=clip.wav`) puts named clips in the prompt from the first chunk on, so those
voices come out under their names; other voices get letters A, B, ... by first appearance.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE, load_audio, to_mono, waveform_audio
from nanodrz.decoding import DecodingOptions
from nanodrz.errors import NanodrzError
from nanodrz.features import FrozenFeatures
from nanodrz.encode_once import EncodedChunk, InputEncoder, StretchEncoder
from nanodrz.prompts import PROMPT_GAP_SECONDS, assemble_prompted_input, single_speaker_stretches
from nanodrz.model import DiarizationModel
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.postprocess import ChunkOutputs
from nanodrz.postprocess.resegment import SILENCE, FrameCounts
from nanodrz.postprocess.voices import VoiceTrack
from nanodrz.segmentation import powerset_counts
from nanodrz.tokenizer import letter

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
MIN_SECONDS = 0.5  # shorter input holds no turn the model could write
# (samples,) 16 kHz audio -> (positions, E) unit speaker embeddings, position t at t / frame_rate seconds.
VoiceFunction = Callable[[np.ndarray], np.ndarray]
# (samples,) 16 kHz audio -> (positions, 3) probabilities of no, one, two or more speakers, same positions.
CountFunction = Callable[[np.ndarray], np.ndarray]
# (recording name, seconds of it read so far, its length in seconds): called as each chunk is read.
ProgressHook = Callable[[str, float, float], None]
# A path, 16 kHz mono samples, or pyannote's in-memory {"waveform": (channels, samples), "sample_rate": Hz}.
AudioSource = str | Path | np.ndarray | Mapping[str, object]


class CountTrack:
    """Frame-level speaker counts (frames, 3) of a recording, assembled chunk by chunk."""

    def __init__(self, frame_rate: float):
        self.frame_rate = frame_rate
        self.parts: list[tuple[int, np.ndarray]] = []

    def add(self, probabilities: np.ndarray, offset_seconds: float) -> None:
        """Chunk probabilities whose first row is the frame at `offset_seconds` of the recording."""
        self.parts.append((int(round(offset_seconds * self.frame_rate)), np.asarray(probabilities, np.float32)))

    def counts(self) -> FrameCounts:
        length = max((first + len(part) for first, part in self.parts), default=0)
        track = np.zeros((length, 3), dtype=np.float32)
        track[:, SILENCE] = 1.0  # a frame no chunk covered counts as silence
        for first, part in self.parts:
            track[first:first + len(part)] = part
        return FrameCounts(track, self.frame_rate)


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
    features: FrozenFeatures | None = None  # the clip's frozen features, with `long_form.encode_once`


class ModelInput(NamedTuple):
    """One chunk's model input: audio (prompt clips, then the chunk), the prompt triples, and with
    `long_form.encode_once` the frozen encoders' features of that audio."""

    audio: np.ndarray
    prompt: list[Turn]
    frozen: FrozenFeatures | None


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



class RecordingState:
    """Long-form progress through one recording: known speakers, turns so far, the chunk stream."""

    def __init__(self, name: str, source: str | Path | np.ndarray, geometry: PromptGeometry,
                 settings: DiarizationSettings, params: PipelineParams, enrolled: dict[str, np.ndarray],
                 seconds: float, voice_window_seconds: float, encoder: StretchEncoder | None = None,
                 input_encoder: InputEncoder | None = None,
                 progress: bool = False, on_progress: ProgressHook | None = None):
        self.name = name
        self.where = name if isinstance(source, np.ndarray) else str(source)  # what error messages name
        self.geometry = geometry
        self.settings = settings
        self.params = params
        self.voice_window_seconds = voice_window_seconds
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
        self.encoder = encoder
        self.input_encoder = None if encoder is not None else input_encoder
        self.encoded: EncodedChunk | None = None
        self.known: list[KnownSpeaker] = []
        for speaker, clip in enrolled.items():
            length = int(geometry.clip_seconds[1] * SAMPLE_RATE)
            clip = clip[:length if encoder is None else encoder.on_grid(min(length, len(clip)))]
            features = None if encoder is None else encoder.encode_alone(clip)
            self.known.append(KnownSpeaker(speaker, clip, float("inf"), enrolled=True, features=features))
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

    def next_input(self) -> ModelInput | None:
        """The next model input (prompt + chunk), or None at the end."""
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
        length = int(clip_seconds * SAMPLE_RATE)
        frozen = None
        if self.encoder is not None:
            before = self.previous_tail
            after = self.upcoming if self.upcoming is not None else np.zeros(0, np.float32)
            self.encoded = self.encoder.encode_chunk(before, chunk, after)
            self.previous_tail = chunk
            length = self.encoder.on_grid(length)
            frozen = self.encoder.assemble([self.encoder.cut(speaker.features, 0, min(length, len(speaker.clip)))
                                            for speaker in self.prompted], self.encoded.features)
        clips = [speaker.clip[:length] for speaker in self.prompted]
        audio, prompt = assemble_prompted_input(clips, chunk, PROMPT_GAP_SECONDS)
        if self.input_encoder is not None:
            frozen, self.encoded = self.input_encoder.encode(audio, len(chunk))
        self.prompt_seconds = (len(audio) - len(chunk)) / SAMPLE_RATE
        return ModelInput(audio, prompt, frozen)

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
        caps = {}
        if settings.max_speakers is not None:
            room = max(0, settings.max_speakers - len(self.known))
            caps["max_speakers"] = max(1, len(self.prompted) + room)
        if is_last_chunk and settings.min_speakers:
            missing = max(0, settings.min_speakers - len(self.known))
            caps["min_speakers"] = len(self.prompted) + missing
        return dataclasses.replace(self.params.decoding, **caps)

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
        by_letter = {letter(i): speaker for i, speaker in enumerate(self.prompted)}
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
        """The current chunk's segmentation-3.0 speaker counts: the chunk's part of the front end's pass
        where it runs that network, else `count_function` on the chunk alone; call before `absorb`, which
        moves the offset past the chunk."""
        self.segmentation = self.segmentation or CountTrack(frame_rate)
        if self.encoded is not None and self.encoded.features.segmentation is not None:
            counts = powerset_counts(self.encoded.features.segmentation.cpu().numpy())
        else:
            counts = count_function(self.current)
        self.segmentation.add(counts, self.offset)

    def add_voices(self, voice_function: VoiceFunction | None, frame_rate: float) -> None:
        """Add the current chunk to the recording's voice track: the window embeddings of the chunk's part
        of its encoding (the model input's pass, or `long_form.encode_once`'s) where the front end makes
        them. Otherwise queue the chunk; every `long_form.voice_block_seconds`, and at the end, `voice_function`
        embeds the queued audio in one go, with half a window of its neighbours' audio on each side so
        that no block edge blurs the voices."""
        if self.encoded is not None:
            self.track = self.track or VoiceTrack(frame_rate, self.voice_window_seconds)
            self.track.add(self.encoded.voices, self.encoded.context_seconds, len(self.current) / SAMPLE_RATE)
            return
        self.unvoiced.append(self.current)
        block = np.concatenate(self.unvoiced)
        if len(block) < self.params.long_form.voice_block_seconds * SAMPLE_RATE and self.upcoming is not None:
            return
        context = int(self.voice_window_seconds / 2 * SAMPLE_RATE)
        following = self.upcoming[:context] if self.upcoming is not None else np.zeros(0, dtype=np.float32)
        audio = np.concatenate([self.previous_tail, block, following]).astype(np.float32)
        self.track = self.track or VoiceTrack(frame_rate, self.voice_window_seconds)
        self.track.add(voice_function(audio), len(self.previous_tail) / SAMPLE_RATE, len(block) / SAMPLE_RATE)
        self.previous_tail = block[-context:]
        self.unvoiced = []

    def _new_speaker(self) -> KnownSpeaker:
        taken = {speaker.label for speaker in self.known}
        label = letter(self.unnamed)
        while label in taken:
            self.unnamed += 1
            label = letter(self.unnamed)
        self.unnamed += 1
        empty = None if self.encoder is None else self.encoder.cut(self.encoder.gap, 0, 0)
        speaker = KnownSpeaker(label, np.zeros(0, dtype=np.float32), 0.0, features=empty)
        self.known.append(speaker)
        return speaker

    def _update_clips(self, local: list[Turn], chunk: np.ndarray) -> None:
        longest = self.geometry.clip_seconds[1]
        for speaker in self.known:
            if speaker.enrolled:
                continue
            for start, end in single_speaker_stretches(local, speaker.label):
                # Keep away from the stretch edges, where the boundary estimate is least sure.
                margin = min(self.params.long_form.clip_margin_seconds, (end - start) / 4)
                start, end = start + margin, end - margin
                quality = min(end - start, longest)
                if quality > speaker.clip_quality:
                    begin, length = int(start * SAMPLE_RATE), int(quality * SAMPLE_RATE)
                    if self.encoder is not None:  # slices of the chunk's features must fall on the frame grid
                        begin = self.encoder.on_grid(begin, up=True)
                        length = self.encoder.on_grid(min(length, len(chunk) - begin))
                        if length <= 0:
                            continue
                        speaker.features = self.encoder.cut(self.encoded.features, begin, length)
                    speaker.clip = chunk[begin: begin + length].copy()
                    speaker.clip_quality = quality

    def chunk_outputs(self) -> ChunkOutputs:
        """What post-processing needs of this recording, once every chunk is decoded."""
        named = frozenset(speaker.label for speaker in self.known if speaker.enrolled)
        return ChunkOutputs(tuple(self.turns), tuple(self.scores), self.track and self.track.voices(),
                            self.counts and self.counts.counts(), self.segmentation and self.segmentation.counts(),
                            named, self.geometry.time_resolution, float(self.loudest))



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



def enrollment_clip(name: str, clip: str | Path | np.ndarray, silence_dbfs: float) -> np.ndarray:
    """A clip that can name a speaker: at least MIN_SECONDS long, peak not below `silence_dbfs`."""
    audio = np.asarray(clip if isinstance(clip, np.ndarray) else load_audio(clip), dtype=np.float32)
    if len(audio) < MIN_SECONDS * SAMPLE_RATE:
        raise NanodrzError(f"enrollment clip for {name!r} is shorter than {MIN_SECONDS} s")
    if not np.all(np.isfinite(audio)):
        raise NanodrzError(f"enrollment clip for {name!r} has NaN or infinite samples")
    if 20 * np.log10(float(np.max(np.abs(audio))) + 1e-12) < silence_dbfs:
        raise NanodrzError(f"enrollment clip for {name!r} is silent (peak below {silence_dbfs:g} dBFS): "
                           "no voice to recognise")
    return audio


