"""The `Diarizer`: a loaded model and its pipeline parameters, ready to diarize paths or arrays.

The expensive stage (front ends and decoding, chunk by chunk: `longform`) leaves `ChunkOutputs`; the
cheap rules (`postprocess`) turn them into the final turns under the pipeline's `PipelineParams`. A
shipped model carries the parameters chosen for it on validation speakers in its metadata
(`nanodrz tune`), so `Diarizer.from_pretrained` diarizes as it was tuned to.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE
from nanodrz.checkpoint import build_model, load_checkpoint
from nanodrz.decoding import DecodingOptions, decode
from nanodrz.encode_once import InputEncoder, StretchEncoder
from nanodrz.errors import ConfigError, NanodrzError
from nanodrz.longform import (MIN_SECONDS, AudioSource, CountFunction, ProgressHook, PromptGeometry, RecordingState,
                              VoiceFunction, check_audio_file, enrollment_clip, in_memory_audio, reading_error,
                              recording_name)
from nanodrz.model import DiarizationModel
from nanodrz.outputs import DiarizeOutput, diarize_output
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.postprocess import ChunkOutputs
from nanodrz.segmentation import SegmentationFrontEnd, powerset_counts

if TYPE_CHECKING:
    from pyannote.core import Annotation

SHIPPED_MODEL = Path(__file__).parent / "models" / "v2_segmentation.safetensors"


class Diarizer:
    """A loaded model and its pipeline parameters, ready to diarize paths or arrays (load once, call many
    times). Every method takes `params` to override the model's own for one call.

    >>> diarizer = Diarizer.from_pretrained()
    >>> annotation = diarizer("meeting.wav")
    """

    def __init__(self, model: DiarizationModel, training_config: dict | None = None,
                 params: PipelineParams | None = None, decode_fn=decode, voice_function: VoiceFunction | None = None,
                 count_function: CountFunction | None = None, encoder_threads: int | None = None):
        self.model = model.eval()
        self.geometry = PromptGeometry.of(model, training_config or {})
        self.params = params or PipelineParams()
        self.decode_fn = decode_fn
        self.voice_function = voice_function
        self.voice_window_seconds = getattr(getattr(model, "front_end", None), "window_seconds", 0.0)
        self.count_function = count_function or model_count_function(model)
        front_end = getattr(model, "front_end", None)
        # With CAM++ windows in the front end, the voice track and the gate read the model input's own pass,
        # run on `encoder_threads` torch threads (None: the caller's).
        self.input_encoder = (InputEncoder(front_end, encoder_threads) if hasattr(front_end, "window_embeddings")
                              else None)

    @property
    def has_voice_track(self) -> bool:
        """Whether labels are merged and re-labelled by voice and get embeddings: the front end's CAM++
        windows, or a `voice_function` given (a model without them)."""
        return self.input_encoder is not None or self.voice_function is not None

    def stretch_encoder(self, params: PipelineParams) -> StretchEncoder | None:
        """The encoder of `long_form.encode_once`, for front ends with frozen CAM++ window embeddings."""
        if not params.long_form.encode_once:
            return None
        front_end = getattr(self.model, "front_end", None)
        if not hasattr(front_end, "window_embeddings"):
            raise ConfigError("long_form.encode_once needs a model whose front end runs CAM++ "
                              "(campplus_windows or campplus_segmentation)")
        return StretchEncoder(front_end, self.voice_window_seconds / 2)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu",
                        encoder_threads: int | None = None) -> "Diarizer":
        """Load a checkpoint (default: the model shipped inside the package) with its tuned parameters;
        `encoder_threads`: torch threads of the frozen encoders' pass (None: the caller's thread count)."""
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
        return cls(build_model(checkpoint).to(torch_device), checkpoint.config, checkpoint.pipeline,
                   encoder_threads=encoder_threads)

    def __call__(self, audio: AudioSource, settings: DiarizationSettings | None = None,
                 enroll: dict[str, str | Path | np.ndarray] | None = None, uri: str | None = None,
                 params: PipelineParams | None = None) -> Annotation:
        """Diarize one recording into a pyannote Annotation (`run(...).speaker_diarization`)."""
        return self.run(audio, settings, enroll, uri, params=params).speaker_diarization

    def run(self, audio: AudioSource, settings: DiarizationSettings | None = None,
            enroll: dict[str, str | Path | np.ndarray] | None = None, uri: str | None = None,
            on_progress: ProgressHook | None = None, params: PipelineParams | None = None) -> DiarizeOutput:
        """Diarize one recording (a path, 16 kHz mono samples, or pyannote's in-memory
        {"waveform": ..., "sample_rate": ...}) into regular and exclusive diarizations and one speaker
        embedding per label, as pyannote.audio 4 pipelines return them."""
        name = uri or recording_name(audio)
        [(_, outcome)] = self.outputs_many([(name, audio)], settings, enroll, batch_size=1, on_progress=on_progress,
                                           params=params)
        if isinstance(outcome, NanodrzError):
            raise outcome
        return outcome

    def diarize_many(self, recordings: Sequence[tuple[str, AudioSource]],
                     settings: DiarizationSettings | None = None,
                     enroll: dict[str, str | Path | np.ndarray] | None = None, batch_size: int = 8,
                     progress: bool = False, params: PipelineParams | None = None
                     ) -> Iterator[tuple[str, list[Turn] | NanodrzError]]:
        """Diarize many recordings, batching the current chunk of up to `batch_size` recordings together.

        Yields (name, turns) per recording in input order, or (name, NanodrzError) for a recording that
        could not be processed; one bad file never stops the others.
        """
        for name, outcome in self.outputs_many(recordings, settings, enroll, batch_size, progress, params=params):
            yield name, outcome if isinstance(outcome, NanodrzError) else list(outcome.turns)

    def outputs_many(self, recordings: Sequence[tuple[str, AudioSource]],
                     settings: DiarizationSettings | None = None,
                     enroll: dict[str, str | Path | np.ndarray] | None = None, batch_size: int = 8,
                     progress: bool = False, on_progress: ProgressHook | None = None,
                     params: PipelineParams | None = None) -> Iterator[tuple[str, DiarizeOutput | NanodrzError]]:
        """`diarize_many` with a `DiarizeOutput` per recording; `on_progress` is called as each chunk
        of each recording is read."""
        params = params or self.params
        settings = settings or DiarizationSettings()
        yield from self._process(recordings, settings, params, enroll, batch_size, progress,
                                 lambda state: self._output(state, params), on_progress)

    def chunk_outputs_many(self, recordings: Sequence[tuple[str, AudioSource]],
                           settings: DiarizationSettings | None = None, batch_size: int = 8, progress: bool = False,
                           params: PipelineParams | None = None
                           ) -> Iterator[tuple[str, ChunkOutputs | NanodrzError]]:
        """The expensive stage alone: (name, ChunkOutputs) per recording, whose `finish(params, settings)`
        replays post-processing under any parameters (decoding and long-form parameters, and speaker
        caps, are this call's). What `nanodrz tune` searches over."""
        yield from self._process(recordings, settings or DiarizationSettings(), params or self.params, None,
                                 batch_size, progress, RecordingState.chunk_outputs)

    def _process(self, recordings: Sequence[tuple[str, AudioSource]], settings: DiarizationSettings,
                 params: PipelineParams, enroll: dict[str, str | Path | np.ndarray] | None, batch_size: int,
                 progress: bool, finish: Callable[[RecordingState], object], on_progress: ProgressHook | None = None
                 ) -> Iterator[tuple[str, object]]:
        if batch_size < 1:
            raise NanodrzError("--batch-size must be at least 1")
        silence = params.resegment.silence_dbfs
        enrolled = {name: enrollment_clip(name, clip, silence) for name, clip in (enroll or {}).items()}
        if len(enrolled) > self.geometry.max_prompt_speakers:
            raise NanodrzError(f"at most {self.geometry.max_prompt_speakers} enrolled speakers fit in this model's prompt")
        encoder = self.stretch_encoder(params)
        bar = tqdm(total=len(recordings), unit="file", disable=not progress, file=sys.stderr)
        for first in range(0, len(recordings), batch_size):
            group = recordings[first:first + batch_size]
            outcomes: dict[str, object] = {}
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
                    states.append(RecordingState(name, source, self.geometry, settings, params, enrolled, seconds,
                                                 self.voice_window_seconds, encoder, self.input_encoder, progress,
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
            groups: dict[DecodingOptions, list[int]] = {}
            for index, state in enumerate(ready):
                groups.setdefault(state.decoding_options(), []).append(index)
            for options, indices in groups.items():
                frozen = [inputs[i].frozen for i in indices]
                extra = {} if frozen[0] is None else {"frozen": frozen}
                results = self.decode_fn(self.model, [inputs[i].audio for i in indices],
                                         [inputs[i].prompt for i in indices], options, **extra)
                for i, result in zip(indices, results):
                    if ready[i].params.resegment.nonspeech_threshold is not None:
                        ready[i].add_segmentation(self.count_function, self.model.config.frame_rate)
                    ready[i].absorb(result.turns, result.scores, result.speaker_counts, self.model.config.frame_rate)
                    if self.has_voice_track:
                        ready[i].add_voices(self.voice_function, self.model.config.frame_rate)

    def _output(self, state: RecordingState, params: PipelineParams) -> DiarizeOutput:
        turns, scores = state.chunk_outputs().finish(params, state.settings)
        # The voice track, also of a silent recording, so its embeddings are (0, E) rather than missing.
        voices = state.track.voices() if state.track is not None else None
        output = diarize_output(state.name, turns, scores, state.settings.exclusive, voices)
        if state.settings.min_speakers and len(output.labels) < state.settings.min_speakers:
            print(f"nanodrz diarize: warning: {state.name}: found {len(output.labels)} speakers, "
                  f"fewer than the {state.settings.min_speakers} asked for", file=sys.stderr)
        return output


def model_count_function(model: DiarizationModel) -> CountFunction:
    """segmentation-3.0's speaker counts as a function of audio, on the model's frames, from a standalone
    pass of that frozen network: for models whose front end does not run it (`campplus_segmentation`'s gate
    reads the front end's own pass), so that every model's speech is cut where it hears none
    (`resegment.nonspeech_threshold`)."""
    front_end = model.front_end
    device = next(model.parameters()).device
    segmenter: list[SegmentationFrontEnd] = []  # built on first use: a model whose gate is off never loads it

    def counts(audio: np.ndarray) -> np.ndarray:
        frames = int(front_end.num_frames(torch.tensor([len(audio)]))[0])
        if not segmenter:
            segmenter.append(SegmentationFrontEnd(device=str(device)))
        return powerset_counts(segmenter[0](audio).resampled(front_end.frame_rate, frames).powerset)

    return counts
