"""Voices of labels: the recording's window speaker embeddings, and the mean voice of chosen frames.

The model's front end computes a speaker embedding around every audio position (CAM++ over a 1.5 s
window, `features.WindowedSpeakerFrontEnd`). Every rule that needs a label's voice takes the unit mean
of those embeddings over some of its frames (`mean_voices`); the rules differ only in which frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from nanodrz.annotation import Turn

# (start, end, [(label, best score) of each label there]): one piece of the time line cut at every boundary.
Piece = tuple[float, float, list[tuple[str, float]]]


@dataclass(frozen=True)
class Voices:
    """A recording's unit window embeddings (frames, E), frame t at t / frame_rate seconds, each pooled
    over `window_seconds` of audio around it."""

    frames: np.ndarray
    frame_rate: float
    window_seconds: float


@dataclass
class VoiceTrack:
    """`Voices` gathered chunk by chunk (float16: an hour of audio is 35 MB)."""

    frame_rate: float
    window_seconds: float
    pieces: list[np.ndarray] = field(default_factory=list)

    def add(self, voices: np.ndarray, first: float, seconds: float) -> None:
        """Append the frames of `voices` (T, E) that cover `seconds` of audio starting `first` seconds
        into the input (after its prompt)."""
        begin = int(round(first * self.frame_rate))
        count = int(round((first + seconds) * self.frame_rate)) - begin
        piece = np.asarray(voices[begin:begin + count], dtype=np.float16)
        if len(piece) < count:
            piece = np.concatenate([piece, np.zeros((count - len(piece), piece.shape[1]), np.float16)])
        self.pieces.append(piece)

    def voices(self) -> Voices:
        frames = np.concatenate(self.pieces).astype(np.float32) if self.pieces else np.zeros((0, 0), np.float32)
        return Voices(frames, self.frame_rate, self.window_seconds)


def mean_voices(voices: Voices, selections: Iterable[tuple[str, slice]]) -> dict[str, tuple[np.ndarray, int]]:
    """label -> (unit mean embedding, frames) over the frames selected for it; labels whose frames sum
    to nothing are left out."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for label, frames in selections:
        chosen = voices.frames[frames]
        if len(chosen):
            sums[label] = sums.get(label, 0.0) + chosen.sum(axis=0, dtype=np.float64)
            counts[label] = counts.get(label, 0) + len(chosen)
    return {label: (total / max(np.linalg.norm(total), 1e-12), counts[label])
            for label, total in sums.items() if np.linalg.norm(total) > 0}


def frame_range(start: float, end: float, voices: Voices) -> slice:
    """The frames centred in [start, end)."""
    rate, limit = voices.frame_rate, len(voices.frames)
    return slice(min(int(np.ceil(start * rate - 1e-6)), limit), min(int(np.ceil(end * rate - 1e-6)), limit))


def solo_interior_frames(turns: Sequence[Turn], voices: Voices, min_stretch_seconds: float
                         ) -> list[tuple[str, slice]]:
    """Per label, the frames whose whole window lies inside one of its single-speaker stretches (the
    middle frame of a stretch shorter than a window); stretches under `min_stretch_seconds` give none."""
    selections = []
    for label, start, end in solo_stretches(turns):
        if end - start < min_stretch_seconds:
            continue
        margin = min(voices.window_seconds / 2, (end - start) / 2)
        first = int(np.ceil((start + margin) * voices.frame_rate - 1e-6))
        last = max(first, int(np.floor((end - margin) * voices.frame_rate + 1e-6)))
        selections.append((label, slice(max(first, 0), min(last + 1, len(voices.frames)))))
    return selections


def solo_piece_frames(pieces: Sequence[Piece], voices: Voices) -> list[tuple[str, slice]]:
    """Per label, the frames of the pieces where it talks alone."""
    return [(active[0][0], frame_range(left, right, voices)) for left, right, active in pieces if len(active) == 1]


def turn_frames(turns: Sequence[Turn], voices: Voices) -> list[tuple[str, slice]]:
    """Per label, the frames of all its turns, overlap included (so a label heard only in overlap still
    has a voice)."""
    return [(turn.speaker, frame_range(turn.start, turn.end, voices)) for turn in turns]


def elementary_pieces(turns: Sequence[Turn], scores: Sequence[float]) -> list[Piece]:
    """The time line cut at every turn boundary, in time order, where someone talks (a sweep over the
    boundaries, so an hour's thousands of turns stay fast)."""
    kept = [(t, s) for t, s in zip(turns, scores) if t.end > t.start]
    bounds = sorted({t.start for t, _ in kept} | {t.end for t, _ in kept})
    starting: dict[float, list[int]] = {}
    ending: dict[float, list[int]] = {}
    for index, (turn, _) in enumerate(kept):
        starting.setdefault(turn.start, []).append(index)
        ending.setdefault(turn.end, []).append(index)
    active: set[int] = set()
    pieces = []
    for left, right in zip(bounds, bounds[1:]):
        active.difference_update(ending.get(left, ()))
        active.update(starting.get(left, ()))
        if active:
            # A label written twice over the same time (the model repeats itself) talks once there.
            best: dict[str, float] = {}
            for i in sorted(active):
                label, score = kept[i][0].speaker, kept[i][1]
                best[label] = max(best.get(label, score), score)
            pieces.append((left, right, list(best.items())))
    return pieces


def solo_stretches(turns: Sequence[Turn]) -> list[tuple[str, float, float]]:
    """(label, start, end) of every longest stretch where one label talks and nobody else does."""
    stretches: list[tuple[str, float, float]] = []
    for left, right, active in elementary_pieces(turns, [0.0] * len(turns)):
        if len(active) != 1:
            continue
        label = active[0][0]
        if stretches and stretches[-1][0] == label and abs(stretches[-1][2] - left) < 1e-9:
            stretches[-1] = (label, stretches[-1][1], right)
        else:
            stretches.append((label, left, right))
    return stretches


def written_seconds(turns: Sequence[Turn]) -> float:
    """Seconds in which at least one speaker is written."""
    total, end = 0.0, float("-inf")
    for turn in sorted(turns, key=lambda t: t.start):
        start = max(turn.start, end)
        if turn.end > start:
            total += turn.end - start
        end = max(end, turn.end)
    return total


def speech_seconds(turns: Sequence[Turn]) -> dict[str, float]:
    """label -> total length of its turns."""
    speech: dict[str, float] = {}
    for turn in turns:
        speech[turn.speaker] = speech.get(turn.speaker, 0.0) + turn.end - turn.start
    return speech
