"""Overlapped speech the decoder did not write, found by the model's overlap head.

The decoder writes the voice it hears best and too often leaves out the second voice of an overlap
(most of the error on overlapped conversations is missed overlap). The overlap head
(`model.overlap_head`) reads every audio frame's final state and says whether none, one, or two or
more speakers talk there; it learns this from dense frame targets, where the decoder learns it from a
few turn tokens. Where the head says two or more and the written turns have only one speaker, the
second speaker is the one whose written turn lies closest in time (the heuristic of Bullock et al.,
"Overlap-aware diarization", ICASSP 2020: an overlap is most often an interruption or a reply that
starts before the other speaker has finished).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn

# Chosen on validation speakers: benchmarks/results/overlap_head.md.
OVERLAP_THRESHOLD = 0.5  # probability of two or more speakers
MIN_OVERLAP_SECONDS = 0.12


class CountTrack:
    """A recording's overlap-head probabilities (frames, 3), assembled chunk by chunk; frame t is
    centred at t / frame_rate seconds of the recording."""

    def __init__(self, frame_rate: float):
        self.frame_rate = frame_rate
        self.parts: list[tuple[int, np.ndarray]] = []

    def add(self, probabilities: np.ndarray, offset_seconds: float) -> None:
        """Chunk probabilities whose first row is the frame at `offset_seconds` of the recording."""
        self.parts.append((int(round(offset_seconds * self.frame_rate)), np.asarray(probabilities, np.float32)))

    def array(self) -> np.ndarray:
        length = max((first + len(part) for first, part in self.parts), default=0)
        track = np.zeros((length, 3), dtype=np.float32)
        track[:, 0] = 1.0  # a frame no chunk covered counts as silence
        for first, part in self.parts:
            track[first:first + len(part)] = part
        return track


def add_missed_overlap(turns: Sequence[Turn], scores: Sequence[float], counts: np.ndarray, frame_rate: float,
                       threshold: float = OVERLAP_THRESHOLD, min_seconds: float = MIN_OVERLAP_SECONDS
                       ) -> tuple[list[Turn], list[float]]:
    """`turns` plus a turn for the second speaker of every stretch of at least `min_seconds` where the
    overlap head's probability of two or more speakers (`counts[:, 2]`) is at least `threshold` and
    exactly one speaker is written. The second speaker is the other label whose nearest turn is
    closest in time; an added turn's score is its mean overlap probability."""
    labels = sorted({turn.speaker for turn in turns})
    if len(labels) < 2 or len(counts) == 0:
        return list(turns), list(scores)
    times = np.arange(len(counts)) / frame_rate
    talking = np.zeros((len(counts), len(labels)), dtype=bool)
    for turn in turns:
        talking[(times >= turn.start) & (times < turn.end), labels.index(turn.speaker)] = True
    alone = np.where(talking.sum(axis=1) == 1, talking.argmax(axis=1), -1)
    candidate = np.where(counts[:, 2] >= threshold, alone, -1)
    boundaries = np.array(sorted({t for turn in turns for t in (turn.start, turn.end)}))
    added_turns, added_scores = [], []
    for first, last in runs(candidate):
        # Frame t covers t / frame_rate +- half a frame; an edge within a frame of a written
        # boundary is that boundary.
        start = snap(max(0.0, (first - 0.5) / frame_rate), boundaries, 1 / frame_rate)
        end = snap((last + 0.5) / frame_rate, boundaries, 1 / frame_rate)
        if end - start < min_seconds - 1e-9:
            continue
        written = labels[candidate[first]]
        second = nearest_other_speaker(turns, written, start, end)
        if second is not None:
            added_turns.append(Turn(round(start, 6), round(end, 6), second))
            added_scores.append(float(counts[first:last + 1, 2].mean()))
    order = sorted(range(len(turns) + len(added_turns)),
                   key=lambda i: (list(turns) + added_turns)[i].start)
    merged_turns, merged_scores = list(turns) + added_turns, list(scores) + added_scores
    return [merged_turns[i] for i in order], [merged_scores[i] for i in order]


def snap(time: float, boundaries: np.ndarray, reach: float) -> float:
    """The nearest of `boundaries` within `reach` of `time`, else `time`."""
    if len(boundaries):
        nearest = float(boundaries[np.abs(boundaries - time).argmin()])
        if abs(nearest - time) <= reach + 1e-9:
            return nearest
    return time


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) frame of every maximal run of one non-negative value."""
    found, first = [], None
    for index, value in enumerate(values):
        if first is not None and value != values[first]:
            found.append((first, index - 1))
            first = None
        if first is None and value >= 0:
            first = index
    if first is not None:
        found.append((first, len(values) - 1))
    return found


def nearest_other_speaker(turns: Sequence[Turn], speaker: str, start: float, end: float) -> str | None:
    """The label other than `speaker` with a turn closest to [start, end) (0 if they touch); ties go to
    the label with more speech."""
    best: tuple[float, float, str] | None = None
    speech: dict[str, float] = {}
    for turn in turns:
        speech[turn.speaker] = speech.get(turn.speaker, 0.0) + turn.end - turn.start
    for turn in turns:
        if turn.speaker == speaker:
            continue
        gap = max(0.0, turn.start - end, start - turn.end)
        key = (gap, -speech[turn.speaker], turn.speaker)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]
