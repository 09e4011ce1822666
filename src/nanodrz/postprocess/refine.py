"""Re-decide who talks where only one label does, by voice.

A label whose single-speaker speech falls into two clearly different voices is split in two (the model
gives two voices one letter most often in crowds). Each label's voice is re-estimated, every
single-speaker stretch is re-labelled frame by frame with the voice its embeddings match best (a
Viterbi path that pays a penalty per change of voice, so a turn that ran over a missed speaker change
is split there), and labels are merged again. Stretches where the model wrote two voices at once are
kept as written: a window over a mix matches neither voice well.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.params import MergeParams, RefineParams
from nanodrz.postprocess.merge import merge_by_voice
from nanodrz.postprocess.voices import Piece, Voices, elementary_pieces, frame_range, mean_voices, solo_piece_frames

# (piece index, start, end, unit mean voice, frames) of one block of a label's single-speaker speech.
Block = tuple[int, float, float, np.ndarray, int]


def refine_labels(turns: Sequence[Turn], scores: Sequence[float], voices: Voices, params: RefineParams,
                  merge: MergeParams, named: frozenset[str] = frozenset()) -> tuple[list[Turn], list[float]]:
    """`params.passes` rounds of: split labels that hold two voices, re-label single-speaker stretches by
    voice, merging labels whose voices match (`merge`) after each step."""
    turns, scores = list(turns), list(scores)
    for index in range(params.passes):
        if index > 0:
            turns, scores = split_labels(turns, scores, voices, params, params.split_threshold, named=named)
            # A split-off voice that is another label's joins it before any frame moves.
            turns = merge_by_voice(turns, voices, merge, named=named)
        turns, scores = reassign_single_speaker_stretches(turns, scores, voices, params.switch_penalty)
        turns = merge_by_voice(turns, voices, merge, named=named)
    return turns, scores


def best_voice_path(similarity: np.ndarray, switch_penalty: float) -> np.ndarray:
    """Viterbi over (labels, frames) similarities: the label sequence with the highest total
    similarity minus `switch_penalty` per change."""
    labels, frames = similarity.shape
    total = similarity[:, 0].astype(np.float64)
    back = np.zeros((labels, frames), dtype=np.int64)
    for t in range(1, frames):
        best = int(total.argmax())
        stay = total >= total[best] - switch_penalty
        back[:, t] = np.where(stay, np.arange(labels), best)
        total = np.where(stay, total, total[best] - switch_penalty) + similarity[:, t]
    path = np.empty(frames, dtype=np.int64)
    path[-1] = int(total.argmax())
    for t in range(frames - 1, 0, -1):
        path[t - 1] = back[path[t], t]
    return path


def reassign_single_speaker_stretches(turns: Sequence[Turn], scores: Sequence[float], voices: Voices,
                                      switch_penalty: float) -> tuple[list[Turn], list[float]]:
    """One pass: each run of single-speaker time re-labelled by the best voice path over its frames.
    Turn boundaries between runs stay exactly where the model wrote them; a new change of voice falls
    halfway between two frames, or on a change the model wrote within a frame of it. Pieces keep the
    score of the turn they came from."""
    pieces = elementary_pieces(turns, scores)
    centroids = mean_voices(voices, solo_piece_frames(pieces, voices))
    if len(centroids) < 2:
        return list(turns), list(scores)
    labels = sorted(centroids)
    label_voices = np.stack([centroids[label][0] for label in labels]).astype(np.float32)
    out_turns: list[Turn] = []
    out_scores: list[float] = []
    run: list[tuple[float, float, str, float]] = []

    def flush() -> None:
        if run:
            for turn, score in relabel_run(run, label_voices, labels, voices, switch_penalty):
                out_turns.append(turn)
                out_scores.append(score)
            run.clear()

    for left, right, active in pieces:
        if len(active) == 1:
            if run and abs(run[-1][1] - left) > 1e-9:
                flush()
            run.append((left, right, *active[0]))
            continue
        flush()
        for label, score in active:
            out_turns.append(Turn(left, right, label))
            out_scores.append(score)
    flush()
    return out_turns, out_scores


def relabel_run(run: list[tuple[float, float, str, float]], label_voices: np.ndarray, labels: list[str],
                voices: Voices, switch_penalty: float) -> list[tuple[Turn, float]]:
    """One run of adjacent single-speaker pieces, re-labelled along its best voice path."""
    start, end = run[0][0], run[-1][1]
    span = frame_range(start, end, voices)
    frames = voices.frames[span]
    if len(frames) == 0:
        return [(Turn(left, right, label), score) for left, right, label, score in run]
    similarity = label_voices @ frames.T
    # Ties go to the label the model wrote.
    for left, right, label, _ in run:
        if label in labels:
            written = frame_range(left, right, voices)
            similarity[labels.index(label), written.start - span.start:written.stop - span.start] += 1e-4
    path = best_voice_path(similarity, switch_penalty)
    changes = [0] + [t for t in range(1, len(path)) if path[t] != path[t - 1]] + [len(path)]
    written = np.array([left for (left, _, label, _), (_, _, previous, _) in zip(run[1:], run) if label != previous])
    frame_seconds = 1 / voices.frame_rate

    def time_of(change: int) -> float:
        if change == 0:
            return start
        if change == len(path):
            return end
        # Within a frame of a change the model wrote, the model's time token is the sharper estimate.
        time = (span.start + change - 0.5) / voices.frame_rate
        if len(written):
            nearest = written[np.abs(written - time).argmin()]
            time = nearest if abs(nearest - time) <= frame_seconds else time
        return float(time)

    result = []
    for first, last in zip(changes, changes[1:]):
        left, right = time_of(first), time_of(last)
        # The score of the written turn that covers most of this piece.
        score = max(run, key=lambda p: min(p[1], right) - max(p[0], left))[3]
        result.append((Turn(left, right, labels[path[first]]), score))
    return result


def voice_blocks(pieces: Sequence[Piece], voices: Voices, params: RefineParams) -> dict[str, list[Block]]:
    """label -> its single-speaker speech cut into blocks of about `params.block_seconds`, for blocks of
    at least `params.min_block_seconds` with a voice."""
    blocks: dict[str, list[Block]] = {}
    for index, (left, right, active) in enumerate(pieces):
        if len(active) != 1:
            continue
        edges = np.linspace(left, right, max(1, int(round((right - left) / params.block_seconds))) + 1)
        for start, end in zip(edges, edges[1:]):
            frames = voices.frames[frame_range(start, end, voices)]
            mean = frames.sum(axis=0, dtype=np.float64)
            if len(frames) >= voices.frame_rate * params.min_block_seconds and np.linalg.norm(mean) > 0:
                blocks.setdefault(active[0][0], []).append(
                    (index, float(start), float(end), mean / np.linalg.norm(mean), len(frames)))
    return blocks


def two_voices(blocks: list[Block], frame_rate: float) -> tuple[np.ndarray, float, list[float]]:
    """2-means on one label's voice blocks: the group of each block, the cosine of the two group voices,
    and the seconds in each group."""
    side, similarity = two_means(np.stack([b[3] for b in blocks]), np.array([b[4] for b in blocks], dtype=np.float64))
    seconds = [sum(b[4] for b, s in zip(blocks, side) if s == k) / frame_rate for k in (0, 1)]
    return side, similarity, seconds


def two_means(vectors: np.ndarray, weights: np.ndarray, iterations: int = 10) -> tuple[np.ndarray, float]:
    """Weighted spherical 2-means from the least similar pair: (group of each vector, the cosine of
    the two group voices)."""
    similarity = vectors @ vectors.T
    first, second = np.unravel_index(int(similarity.argmin()), similarity.shape)
    centres = vectors[[first, second]].astype(np.float64)
    for _ in range(iterations):
        side = (vectors @ centres.T).argmax(axis=1)
        for k in (0, 1):
            if (side == k).any():
                total = (vectors[side == k] * weights[side == k, None]).sum(axis=0)
                centres[k] = total / max(np.linalg.norm(total), 1e-12)
    return side, float(centres[0] @ centres[1])


def split_labels(turns: Sequence[Turn], scores: Sequence[float], voices: Voices, params: RefineParams,
                 threshold: float, named: frozenset[str] = frozenset()
                 ) -> tuple[list[Turn], list[float]]:
    """Each unnamed label's single-speaker blocks split into two groups by 2-means on their voices; where
    the groups' voices have a cosine below `threshold` and each holds at least
    `params.min_split_seconds`, the smaller group gets a new label."""
    pieces = elementary_pieces(turns, scores)
    labels = sorted({t.speaker for t in turns})
    blocks = voice_blocks(pieces, voices, params)
    moved: dict[int, list[tuple[float, float, str]]] = {}
    count = len(labels)
    for label in labels:
        if label in named or len(blocks.get(label, ())) < params.min_blocks:
            continue
        side, similarity, seconds = two_voices(blocks[label], voices.frame_rate)
        if similarity >= threshold or min(seconds) < params.min_split_seconds:
            continue
        new_label = fresh_label(labels, count)
        count += 1
        smaller = int(np.argmin(seconds))
        for (index, start, end, _, _), group in zip(blocks[label], side):
            if group == smaller:
                moved.setdefault(index, []).append((start, end, new_label))
    if not moved:
        return list(turns), list(scores)
    out_turns, out_scores = [], []
    for index, (left, right, active) in enumerate(pieces):
        if index not in moved:
            out_turns += [Turn(left, right, label) for label, _ in active]
            out_scores += [score for _, score in active]
            continue
        (label, score), = active
        cursor = left
        for start, end, new_label in moved[index]:
            if start > cursor:
                out_turns.append(Turn(cursor, start, label))
                out_scores.append(score)
            out_turns.append(Turn(start, end, new_label))
            out_scores.append(score)
            cursor = end
        if cursor < right:
            out_turns.append(Turn(cursor, right, label))
            out_scores.append(score)
    return out_turns, out_scores


def fresh_label(taken: Sequence[str], index: int) -> str:
    """A temporary label not in `taken` (labels are renamed in order of first turn afterwards)."""
    while f"~{index}" in taken:
        index += 1
    return f"~{index}"
