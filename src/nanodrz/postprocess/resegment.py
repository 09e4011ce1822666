"""Resegmentation by frame-level speaker counts: where speech is, and where two voices are.

The decoder writes turns from a few tokens each; it leaves out speech (most often near the end of a
chunk, or quiet and noisy speech), writes turns over pauses, and too often leaves out the second voice
of an overlap. The overlap head (`model.overlap_head`) learns from dense frame targets how many speakers
talk in every 40 ms frame: none, one, or two or more. After long-form stitching and re-labelling:

1. Where the head gives two or more speakers at least `overlap_threshold` for at least
   `min_overlap_seconds` and one speaker is written, the second speaker is the other label whose turn
   lies closest in time (the heuristic of Bullock et al., "Overlap-aware diarization", ICASSP 2020: an
   overlap is most often an interruption, or a reply that starts before the other speaker has finished).
2. A written turn loses every stretch of at least `min_gap_seconds` where the head gives silence a
   probability of at least `speech_threshold`.
3. A stretch of at least `min_speech_seconds` where nothing is written and the head gives speech (one
   or more) at least `speech_threshold` goes to the speaker whose written turn lies closest in time.

segmentation-3.0's counts (models with the `campplus_segmentation` front end) cut speech the same way
as step 2, at `nonspeech_threshold`. Letters stay the decoder's and the re-labelling's: the counts only
say how many speak, not who.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.params import ResegmentParams
from nanodrz.postprocess.voices import speech_seconds

SILENCE, ONE, TWO_OR_MORE = 0, 1, 2


@dataclass(frozen=True)
class FrameCounts:
    """Probabilities of no, one, two or more speakers (frames, 3), frame t centred at t / frame_rate s."""

    probabilities: np.ndarray
    frame_rate: float


def resegment(turns: Sequence[Turn], scores: Sequence[float], counts: np.ndarray, frame_rate: float,
              params: ResegmentParams) -> tuple[list[Turn], list[float]]:
    """Steps 1-3 of the module docstring, in order (a threshold of None skips its steps); turns come back
    sorted by start."""
    turns, scores = list(turns), list(scores)
    if params.overlap_threshold is not None:
        turns, scores = add_missed_overlap(turns, scores, counts, frame_rate, params.overlap_threshold,
                                           params.min_overlap_seconds)
    if params.speech_threshold is not None:
        turns, scores = remove_silence(turns, scores, counts, frame_rate, params.speech_threshold,
                                       params.min_gap_seconds)
        turns, scores = add_missed_speech(turns, scores, counts, frame_rate, params.speech_threshold,
                                          params.min_speech_seconds)
    order = sorted(range(len(turns)), key=lambda i: (turns[i].start, turns[i].end, turns[i].speaker))
    return [turns[i] for i in order], [scores[i] for i in order]


def overlapped_seconds(counts: np.ndarray, frame_rate: float, threshold: float) -> float:
    """Seconds where the probability of two or more speakers is at least `threshold`."""
    return float((counts[:, TWO_OR_MORE] >= threshold).sum()) / frame_rate if len(counts) else 0.0


def add_missed_overlap(turns: Sequence[Turn], scores: Sequence[float], counts: np.ndarray, frame_rate: float,
                       threshold: float, min_seconds: float
                       ) -> tuple[list[Turn], list[float]]:
    """`turns` plus a turn for the second speaker of every stretch of at least `min_seconds` where the
    probability of two or more speakers is at least `threshold` and exactly one speaker is written. An
    added turn's score is its mean overlap probability."""
    labels = sorted({turn.speaker for turn in turns})
    if len(labels) < 2 or len(counts) == 0:
        return list(turns), list(scores)
    talking = _talking(turns, labels, len(counts), frame_rate)
    alone = np.where(talking.sum(axis=1) == 1, talking.argmax(axis=1), -1)
    candidate = np.where(counts[:, TWO_OR_MORE] >= threshold, alone, -1)
    added_turns, added_scores = [], []
    for first, last, start, end in _stretches(candidate, turns, frame_rate, min_seconds):
        second = nearest_speaker(turns, start, end, besides=labels[candidate[first]])
        if second is not None:
            added_turns.append(Turn(start, end, second))
            added_scores.append(float(counts[first:last + 1, TWO_OR_MORE].mean()))
    return list(turns) + added_turns, list(scores) + added_scores


def remove_silence(turns: Sequence[Turn], scores: Sequence[float], counts: np.ndarray, frame_rate: float,
                   threshold: float, min_seconds: float
                   ) -> tuple[list[Turn], list[float]]:
    """`turns` with every stretch of at least `min_seconds` where the probability of silence is at least
    `threshold` cut out (a turn may fall apart into pieces, each with the turn's score)."""
    silent = np.where(counts[:, SILENCE] >= threshold, 0, -1)
    gaps = [(start, end) for _, _, start, end in _stretches(silent, turns, frame_rate, min_seconds)]
    out_turns, out_scores = [], []
    for turn, score in zip(turns, scores):
        cursor = turn.start
        for start, end in gaps:
            if end <= cursor or start >= turn.end:
                continue
            if start > cursor:
                out_turns.append(Turn(cursor, start, turn.speaker))
                out_scores.append(score)
            cursor = max(cursor, end)
        if turn.end > cursor:
            out_turns.append(Turn(cursor, turn.end, turn.speaker))
            out_scores.append(score)
    return out_turns, out_scores


def add_missed_speech(turns: Sequence[Turn], scores: Sequence[float], counts: np.ndarray, frame_rate: float,
                      threshold: float, min_seconds: float
                      ) -> tuple[list[Turn], list[float]]:
    """`turns` plus a turn for every stretch of at least `min_seconds` where nothing is written and the
    probability of speech is at least `threshold`, given to the speaker whose turn is closest in time;
    its score is its mean speech probability."""
    if not turns or len(counts) == 0:
        return list(turns), list(scores)
    labels = sorted({turn.speaker for turn in turns})
    written = _talking(turns, labels, len(counts), frame_rate).any(axis=1)
    candidate = np.where((1.0 - counts[:, SILENCE] >= threshold) & ~written, 0, -1)
    added_turns, added_scores = [], []
    for first, last, start, end in _stretches(candidate, turns, frame_rate, min_seconds):
        added_turns.append(Turn(start, end, nearest_speaker(turns, start, end)))
        added_scores.append(float(1.0 - counts[first:last + 1, SILENCE].mean()))
    return list(turns) + added_turns, list(scores) + added_scores


def _talking(turns: Sequence[Turn], labels: list[str], num_frames: int, frame_rate: float) -> np.ndarray:
    """(frames, labels): label l is written at frame t (centred at t / frame_rate)."""
    times = np.arange(num_frames) / frame_rate
    talking = np.zeros((num_frames, len(labels)), dtype=bool)
    for turn in turns:
        talking[(times >= turn.start) & (times < turn.end), labels.index(turn.speaker)] = True
    return talking


def _stretches(values: np.ndarray, turns: Sequence[Turn], frame_rate: float, min_seconds: float
               ) -> list[tuple[int, int, float, float]]:
    """(first frame, last frame, start s, end s) of every run of one non-negative value lasting at least
    `min_seconds`. Frame t covers t / frame_rate +- half a frame; an edge within a frame of a written
    turn boundary moves onto it."""
    boundaries = np.array(sorted({time for turn in turns for time in (turn.start, turn.end)}))
    found = []
    for first, last in runs(values):
        start = snap(max(0.0, (first - 0.5) / frame_rate), boundaries, 1 / frame_rate)
        end = snap((last + 0.5) / frame_rate, boundaries, 1 / frame_rate)
        if end - start >= min_seconds - 1e-9:
            found.append((first, last, round(start, 6), round(end, 6)))
    return found


def snap(time: float, boundaries: np.ndarray, reach: float) -> float:
    """The nearest of `boundaries` within `reach` of `time`, else `time`."""
    if len(boundaries):
        nearest = float(boundaries[np.abs(boundaries - time).argmin()])
        if abs(nearest - time) <= reach + 1e-9:
            return nearest
    return time


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of every maximal run of one non-negative value."""
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


def nearest_speaker(turns: Sequence[Turn], start: float, end: float, besides: str | None = None) -> str | None:
    """The label (other than `besides`) with a turn closest to [start, end) (0 if they touch or
    overlap); ties go to the label with more speech."""
    speech = speech_seconds(turns)
    best: tuple[float, float, str] | None = None
    for turn in turns:
        if turn.speaker == besides:
            continue
        key = (max(0.0, turn.start - end, start - turn.end), -speech[turn.speaker], turn.speaker)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]
