"""One label per voice over a whole recording: merge labels whose voices match, after long-form stitching.

Prompting carries labels from chunk to chunk only for the speakers that fit in the prompt, and only
as well as the model recognises a clip; a voice it fails to match comes back under a new label. The
model's front end computes a speaker embedding around every audio position (CAM++ over 1.5 s,
`features.WindowedSpeakerFrontEnd`), so each label's voice is the mean of those embeddings over the
stretches where that label talks alone. Labels are then merged greedily, most similar pair first
(centroid linkage, as pyannote's final clustering), while the cosine is at least a threshold, then
further while there are more labels than `max_speakers`. Enrolled names are never merged with each
other; a letter that merges into one takes its name.

Then the same embeddings re-decide who talks where only one label does (`refine_labels`). A label
whose single-speaker speech falls into two clearly different voices is split in two (the model
gives two voices one letter most often in crowds). Each label's voice is re-estimated, every
single-speaker stretch is re-labelled frame by frame with the voice its embeddings match best (a
Viterbi path that pays a penalty per change of voice, so a turn that ran over a missed speaker
change is split there), and labels are merged again. Stretches where the model wrote two voices at
once are kept as written: a window over a mix matches neither voice well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn

# Chosen on validation speakers: benchmarks/results/merge_threshold.md.
MERGE_THRESHOLD = 0.85
WINDOW_SECONDS = 1.5
MIN_STRETCH_SECONDS = 0.5
# Chosen on validation speakers: benchmarks/results/voice_refinement.md.
REFINE_PASSES = 3
SWITCH_PENALTY = 0.25  # in cosine similarity, per change of voice
SPLIT_THRESHOLD = 0.7  # a label splits when its two halves' voices are less similar than this
MIN_SPLIT_SECONDS = 1.5  # of single-speaker speech on each side
SPLIT_BLOCK_SECONDS = 1.5
DOMINANT_SHARE = 0.9  # of all written speech: a label this large may hold two voices (`split_dominant_label`)
# It does when its two voice groups are this far apart, or when overlap is heard and they are at least
# this far apart. Chosen on validation speakers: benchmarks/results/label_rules.md.
TWO_VOICE_COSINE = 0.85
TWO_VOICE_SECONDS = 3.0  # in the smaller group
SAME_VOICE_COSINE = 0.95
# A label with less written speech than this is an artefact more often than a speaker (pyannote's
# `min_cluster_size` in spirit): it joins the label whose voice it is closest to. Chosen with the two above.
MIN_LABEL_SECONDS = 1.5


@dataclass
class VoiceTally:
    """Per label, the sum of the unit window embeddings over the frames where it talks alone."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, turns: Sequence[Turn], voices: np.ndarray, frame_rate: float) -> None:
        """Count the frames of `voices` (T, E), frame t at t / frame_rate seconds of the turns' time line,
        whose whole window lies inside one label's single-speaker stretch (its middle frame for
        stretches shorter than a window)."""
        for label, start, end in solo_stretches(turns):
            if end - start < MIN_STRETCH_SECONDS:
                continue
            margin = min(WINDOW_SECONDS / 2, (end - start) / 2)
            first = int(np.ceil((start + margin) * frame_rate - 1e-6))
            last = max(first, int(np.floor((end - margin) * frame_rate + 1e-6)))
            frames = voices[max(first, 0):min(last + 1, len(voices))]
            if len(frames) == 0:
                continue
            self.sums[label] = self.sums.get(label, 0.0) + frames.sum(axis=0, dtype=np.float64)
            self.counts[label] = self.counts.get(label, 0) + len(frames)

    def centroids(self) -> dict[str, tuple[np.ndarray, int]]:
        """label -> (unit mean voice, frame count)."""
        return {label: (total / max(np.linalg.norm(total), 1e-12), self.counts[label])
                for label, total in self.sums.items() if np.linalg.norm(total) > 0}


def merge_labels(centroids: dict[str, tuple[np.ndarray, int]], threshold: float, min_speakers: int = 0,
                 max_speakers: int | None = None, named: frozenset[str] = frozenset(),
                 unmeasured: int = 0) -> dict[str, str]:
    """{old label: kept label} from greedy centroid-linkage merging.

    A pair is merged while its cosine is at least `threshold` and more than `min_speakers` labels are
    left, then (most similar first) while more than `max_speakers` are. `unmeasured` labels (no
    centroid: they never talked alone long enough) count towards both limits but are never merged.
    Two `named` labels never merge; a named label absorbs an unnamed one.
    """
    clusters = {label: (vector.astype(np.float64), float(weight)) for label, (vector, weight) in centroids.items()}
    owner = {label: label for label in centroids}
    while len(clusters) > 1:
        pair, similarity = _most_similar(clusters, named)
        if pair is None:
            break
        left = len(clusters) + unmeasured
        over_max = max_speakers is not None and left > max_speakers
        if not over_max and (similarity < threshold or left <= min_speakers):
            break
        keep, drop = pair if pair[0] in named or pair[1] not in named else pair[::-1]
        (a, wa), (b, wb) = clusters[keep], clusters.pop(drop)
        merged = a * wa + b * wb
        clusters[keep] = (merged / max(np.linalg.norm(merged), 1e-12), wa + wb)
        for label, current in owner.items():
            if current == drop:
                owner[label] = keep
    return owner


def _most_similar(clusters: dict[str, tuple[np.ndarray, float]], named: frozenset[str]
                  ) -> tuple[tuple[str, str] | None, float]:
    labels = sorted(clusters)
    best, best_pair = -np.inf, None
    for i, left in enumerate(labels):
        for right in labels[i + 1:]:
            if left in named and right in named:
                continue
            similarity = float(clusters[left][0] @ clusters[right][0])
            if similarity > best:
                best, best_pair = similarity, (left, right)
    return best_pair, best


@dataclass
class VoiceTrack:
    """The window embeddings of a whole recording, frame t at t / frame_rate seconds, gathered chunk
    by chunk (float16: an hour of audio is 35 MB)."""

    frame_rate: float
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

    def array(self) -> np.ndarray:
        return np.concatenate(self.pieces).astype(np.float32) if self.pieces else np.zeros((0, 0), np.float32)


def elementary_pieces(turns: Sequence[Turn], scores: Sequence[float]) -> list[tuple[float, float, list[tuple[str, float]]]]:
    """The time line cut at every turn boundary: (start, end, [(label, best score) of each label there]),
    in time order (a sweep over the boundaries, so an hour's thousands of turns stay fast)."""
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


def label_centroids(pieces: list[tuple[float, float, list[tuple[str, float]]]], track: np.ndarray,
                    frame_rate: float) -> dict[str, tuple[np.ndarray, int]]:
    """label -> (unit mean embedding, frames) over the frames where that label talks alone."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for left, right, active in pieces:
        if len(active) != 1:
            continue
        frames = track[_frame_range(left, right, frame_rate, len(track))]
        if len(frames):
            label = active[0][0]
            sums[label] = sums.get(label, 0.0) + frames.sum(axis=0, dtype=np.float64)
            counts[label] = counts.get(label, 0) + len(frames)
    return {label: (total / max(np.linalg.norm(total), 1e-12), counts[label])
            for label, total in sums.items() if np.linalg.norm(total) > 0}


def _frame_range(left: float, right: float, frame_rate: float, limit: int) -> slice:
    return slice(min(int(np.ceil(left * frame_rate - 1e-6)), limit), min(int(np.ceil(right * frame_rate - 1e-6)), limit))


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


def reassign_single_speaker_stretches(turns: Sequence[Turn], scores: Sequence[float], track: np.ndarray,
                                      frame_rate: float, switch_penalty: float) -> tuple[list[Turn], list[float]]:
    """One pass: each run of single-speaker time re-labelled by the best voice path over its frames.
    Turn boundaries between runs stay exactly where the model wrote them; a new change of voice falls
    halfway between two frames, or on a change the model wrote within a frame of it. Pieces keep the
    score of the turn they came from."""
    pieces = elementary_pieces(turns, scores)
    centroids = label_centroids(pieces, track, frame_rate)
    if len(centroids) < 2:
        return list(turns), list(scores)
    labels = sorted(centroids)
    voices = np.stack([centroids[label][0] for label in labels]).astype(np.float32)
    out_turns: list[Turn] = []
    out_scores: list[float] = []
    run: list[tuple[float, float, str, float]] = []

    def flush() -> None:
        if run:
            for turn, score in _relabel_run(run, voices, labels, track, frame_rate, switch_penalty):
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


def _relabel_run(run: list[tuple[float, float, str, float]], voices: np.ndarray, labels: list[str],
                 track: np.ndarray, frame_rate: float, switch_penalty: float) -> list[tuple[Turn, float]]:
    start, end = run[0][0], run[-1][1]
    span = _frame_range(start, end, frame_rate, len(track))
    frames = track[span]
    if len(frames) == 0:
        return [(Turn(left, right, label), score) for left, right, label, score in run]
    similarity = voices @ frames.T
    # Ties go to the label the model wrote.
    for left, right, label, _ in run:
        if label in labels:
            written = _frame_range(left, right, frame_rate, len(track))
            similarity[labels.index(label), written.start - span.start:written.stop - span.start] += 1e-4
    path = best_voice_path(similarity, switch_penalty)
    changes = [0] + [t for t in range(1, len(path)) if path[t] != path[t - 1]] + [len(path)]
    written = np.array([left for (left, _, label, _), (_, _, previous, _) in zip(run[1:], run) if label != previous])

    def time_of(change: int) -> float:
        if change == 0:
            return start
        if change == len(path):
            return end
        # Within a frame of a change the model wrote, the model's time token is the sharper estimate.
        time = (span.start + change - 0.5) / frame_rate
        if len(written):
            nearest = written[np.abs(written - time).argmin()]
            time = nearest if abs(nearest - time) <= 1 / frame_rate else time
        return float(time)

    result = []
    for first, last in zip(changes, changes[1:]):
        left, right = time_of(first), time_of(last)
        # The score of the written turn that covers most of this piece.
        score = max(run, key=lambda p: min(p[1], right) - max(p[0], left))[3]
        result.append((Turn(left, right, labels[path[first]]), score))
    return result


def voice_blocks(pieces: list[tuple[float, float, list[tuple[str, float]]]], track: np.ndarray, frame_rate: float
                 ) -> dict[str, list[tuple[int, float, float, np.ndarray, int]]]:
    """label -> its single-speaker speech cut into blocks of about `SPLIT_BLOCK_SECONDS`: (piece index,
    start, end, unit mean voice, frames), for blocks of at least 0.2 s with a voice."""
    blocks: dict[str, list[tuple[int, float, float, np.ndarray, int]]] = {}
    for index, (left, right, active) in enumerate(pieces):
        if len(active) != 1:
            continue
        edges = np.linspace(left, right, max(1, int(round((right - left) / SPLIT_BLOCK_SECONDS))) + 1)
        for start, end in zip(edges, edges[1:]):
            frames = track[_frame_range(start, end, frame_rate, len(track))]
            mean = frames.sum(axis=0, dtype=np.float64)
            if len(frames) >= frame_rate * 0.2 and np.linalg.norm(mean) > 0:
                blocks.setdefault(active[0][0], []).append(
                    (index, float(start), float(end), mean / np.linalg.norm(mean), len(frames)))
    return blocks


def two_voices(blocks: list[tuple[int, float, float, np.ndarray, int]], frame_rate: float
               ) -> tuple[np.ndarray, float, list[float]]:
    """2-means on one label's voice blocks: the group of each block, the cosine of the two group voices,
    and the seconds in each group."""
    side, similarity = _two_means(np.stack([b[3] for b in blocks]), np.array([b[4] for b in blocks], dtype=np.float64))
    seconds = [sum(b[4] for b, s in zip(blocks, side) if s == k) / frame_rate for k in (0, 1)]
    return side, similarity, seconds


def dominant_label_voices(turns: Sequence[Turn], track: np.ndarray, frame_rate: float
                          ) -> tuple[str, float, float, float] | None:
    """For the label with the most written speech: (label, its share of all written speech, the cosine
    of its two voices by 2-means on its blocks, the seconds of the smaller group); None when there is no
    speech or that label has fewer than 4 blocks."""
    speech = speech_seconds(turns)
    if not speech:
        return None
    dominant = max(speech, key=speech.get)
    blocks = voice_blocks(elementary_pieces(turns, [0.0] * len(turns)), track, frame_rate).get(dominant, [])
    if len(blocks) < 4:
        return None
    _, similarity, seconds = two_voices(blocks, frame_rate)
    return dominant, speech[dominant] / sum(speech.values()), similarity, min(seconds)


def split_labels(turns: Sequence[Turn], scores: Sequence[float], track: np.ndarray, frame_rate: float,
                 threshold: float = SPLIT_THRESHOLD, min_seconds: float = MIN_SPLIT_SECONDS,
                 max_speakers: int | None = None, named: frozenset[str] = frozenset()
                 ) -> tuple[list[Turn], list[float]]:
    """Each unnamed label's single-speaker speech, cut into blocks of about 1.5 s, split into two
    groups by 2-means on the blocks' voices; where the groups' voices have a cosine below `threshold`
    and each holds at least `min_seconds`, the smaller group gets a new label (while fewer than
    `max_speakers` labels exist)."""
    pieces = elementary_pieces(turns, scores)
    labels = sorted({t.speaker for t in turns})
    blocks = voice_blocks(pieces, track, frame_rate)
    moved: dict[int, list[tuple[float, float, str]]] = {}
    count = len(labels)
    for label in labels:
        if label in named or len(blocks.get(label, ())) < 4 or (max_speakers is not None and count >= max_speakers):
            continue
        side, similarity, seconds = two_voices(blocks[label], frame_rate)
        if similarity >= threshold or min(seconds) < min_seconds:
            continue
        new_label = _fresh_label(labels, count)
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


def split_dominant_label(turns: Sequence[Turn], scores: Sequence[float], track: np.ndarray, frame_rate: float,
                         max_speakers: int | None = None, named: frozenset[str] = frozenset(),
                         switch_penalty: float = SWITCH_PENALTY) -> tuple[list[Turn], list[float]]:
    """Two voices for the label with the most speech, for a recording where something else says that
    label holds more than one (the overlap head heard two voices at once while almost all speech
    carries it): its blocks are split by 2-means whatever the cosine of the two groups, then
    single-speaker stretches are re-labelled by voice. No merge follows, since two real voices can be as
    close as the merge threshold (the telephone speakers of the real sample: 0.85 between the groups).
    Enrolled (`named`) labels are never split."""
    speech = speech_seconds(turns)
    if not speech:
        return list(turns), list(scores)
    dominant = max(speech, key=speech.get)
    others = frozenset(speech) - {dominant}
    turns, scores = split_labels(turns, scores, track, frame_rate, threshold=np.inf, max_speakers=max_speakers,
                                 named=named | others)
    return reassign_single_speaker_stretches(turns, scores, track, frame_rate, switch_penalty)


def absorb_small_labels(turns: Sequence[Turn], track: np.ndarray, frame_rate: float, min_seconds: float = MIN_LABEL_SECONDS,
                        min_speakers: int = 0, named: frozenset[str] = frozenset()) -> list[Turn]:
    """`turns` with every unnamed label of less than `min_seconds` of speech relabelled as the label
    whose voice is most similar (voices: the mean embedding over all of a label's turns, so a label
    heard only in overlap still has one), smallest first, while more than `min_speakers` labels are
    left."""
    speech = speech_seconds(turns)
    voices = turn_voices(turns, track, frame_rate)
    owner = {label: label for label in speech}
    for label in sorted(speech, key=speech.get):
        alive = {owner[other] for other in speech}
        if speech[label] >= min_seconds or label in named or label not in voices or len(alive) <= max(min_speakers, 1):
            continue
        others = [other for other in sorted(alive) if other != label and other in voices]
        if others:
            target = max(others, key=lambda other: float(voices[label] @ voices[other]))
            for key, current in owner.items():
                if current == label:
                    owner[key] = target
    return [Turn(t.start, t.end, owner[t.speaker]) for t in turns]


def turn_voices(turns: Sequence[Turn], track: np.ndarray, frame_rate: float) -> dict[str, np.ndarray]:
    """label -> unit mean embedding over all of its turns, overlap included (so a label heard only in
    overlap still has a voice); labels without any frame of `track` are left out."""
    voices: dict[str, np.ndarray] = {}
    for label in speech_seconds(turns):
        frames = [track[_frame_range(t.start, t.end, frame_rate, len(track))] for t in turns if t.speaker == label]
        total = np.concatenate(frames).sum(axis=0, dtype=np.float64) if frames else np.zeros(0)
        if total.size and np.linalg.norm(total) > 0:
            voices[label] = total / np.linalg.norm(total)
    return voices


def speech_seconds(turns: Sequence[Turn]) -> dict[str, float]:
    """label -> total length of its turns."""
    speech: dict[str, float] = {}
    for turn in turns:
        speech[turn.speaker] = speech.get(turn.speaker, 0.0) + turn.end - turn.start
    return speech


def _two_means(vectors: np.ndarray, weights: np.ndarray, iterations: int = 10) -> tuple[np.ndarray, float]:
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


def _fresh_label(taken: Sequence[str], index: int) -> str:
    """A temporary label not in `taken` (labels are renamed in order of first turn afterwards)."""
    while f"~{index}" in taken:
        index += 1
    return f"~{index}"


def refine_labels(turns: Sequence[Turn], scores: Sequence[float], track: np.ndarray, frame_rate: float,
                  passes: int = REFINE_PASSES, switch_penalty: float = SWITCH_PENALTY,
                  threshold: float = MERGE_THRESHOLD, min_speakers: int = 0, max_speakers: int | None = None,
                  named: frozenset[str] = frozenset()) -> tuple[list[Turn], list[float]]:
    """`passes` rounds of: split labels that hold two voices, re-label single-speaker stretches by
    voice, merging labels whose voices match (same rules as `merge_labels`) after each step."""
    turns, scores = list(turns), list(scores)
    for index in range(passes):
        if index > 0:
            turns, scores = split_labels(turns, scores, track, frame_rate, max_speakers=max_speakers, named=named)
            # A split-off voice that is another label's joins it before any frame moves.
            turns = merge_by_voice(turns, track, frame_rate, threshold, min_speakers, max_speakers, named)
        reassigned = reassign_single_speaker_stretches(turns, scores, track, frame_rate, switch_penalty)
        # A label can lose all its speech to other voices; never below the speakers asked for.
        if len({t.speaker for t in reassigned[0]}) >= min(min_speakers, len({t.speaker for t in turns})):
            turns, scores = reassigned
        turns = merge_by_voice(turns, track, frame_rate, threshold, min_speakers, max_speakers, named)
    return turns, scores


def merge_by_voice(turns: Sequence[Turn], track: np.ndarray, frame_rate: float, threshold: float,
                   min_speakers: int = 0, max_speakers: int | None = None,
                   named: frozenset[str] = frozenset()) -> list[Turn]:
    """`turns` with labels merged by `merge_labels`, each label's voice tallied over `track` (frame t at
    t / frame_rate s) without the frames whose window reaches over a change of speaker."""
    tally = VoiceTally()
    tally.add(turns, track, frame_rate)
    centroids = tally.centroids()
    unmeasured = {t.speaker for t in turns} - set(centroids)
    owner = merge_labels(centroids, threshold, min_speakers, max_speakers, named, unmeasured=len(unmeasured))
    return [Turn(t.start, t.end, owner.get(t.speaker, t.speaker)) for t in turns]
