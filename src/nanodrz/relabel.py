"""One label per voice over a whole recording: merge labels whose voices match, after long-form stitching.

Prompting carries labels from chunk to chunk only for the speakers that fit in the prompt, and only
as well as the model recognises a clip; a voice it fails to match comes back under a new label. The
model's front end already computes a speaker embedding around every audio position (CAM++ over
1.5 s, `features.WindowedSpeakerFrontEnd`), so each label's voice is known at no extra cost: the
mean of those embeddings over the stretches where that label talks alone. Labels are then merged
greedily, most similar pair first (centroid linkage, as pyannote's final clustering), while the
cosine is at least a threshold, then further while there are more labels than `max_speakers`.
Enrolled names are never merged with each other; a letter that merges into one takes its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.examples import single_speaker_stretches

# Chosen on validation speakers: benchmarks/results/merge_threshold.md.
MERGE_THRESHOLD = 0.85
WINDOW_SECONDS = 1.5
MIN_STRETCH_SECONDS = 0.5


@dataclass
class VoiceTally:
    """Per label, the sum of the unit window embeddings over the frames where it talks alone."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, turns: Sequence[Turn], voices: np.ndarray, frame_rate: float, offset: float = 0.0) -> None:
        """Count the frames of `voices` (T, E), frame t at `offset + t / frame_rate` seconds of the turns'
        time line, whose whole window lies inside one label's single-speaker stretch (its middle frame
        for stretches shorter than a window)."""
        for label in sorted({t.speaker for t in turns}):
            for start, end in single_speaker_stretches(turns, label):
                if end - start < MIN_STRETCH_SECONDS:
                    continue
                margin = min(WINDOW_SECONDS / 2, (end - start) / 2)
                first = int(np.ceil((start + margin - offset) * frame_rate - 1e-6))
                last = max(first, int(np.floor((end - margin - offset) * frame_rate + 1e-6)))
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
