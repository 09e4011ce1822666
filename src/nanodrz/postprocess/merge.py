"""Merge labels whose voices match, after long-form stitching.

Prompting carries labels from chunk to chunk only for the speakers that fit in the prompt, and only as
well as the model recognises a clip; a voice it fails to match comes back under a new label. Each
label's voice is the mean embedding where it talks alone; labels are merged greedily, most similar
pair first (centroid linkage, as pyannote's final clustering), while the cosine is at least a
threshold, then further while there are more labels than `max_speakers` (`count`). Enrolled names are never
merged with each other; a letter that merges into one takes its name.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.params import MergeParams
from nanodrz.postprocess.voices import Voices, mean_voices, solo_interior_frames


def merge_labels(centroids: dict[str, tuple[np.ndarray, int]], threshold: float | None,
                 max_speakers: int | None = None, named: frozenset[str] = frozenset(),
                 unmeasured: int = 0) -> dict[str, str]:
    """{old label: kept label} from greedy centroid-linkage merging.

    A pair is merged while its cosine is at least `threshold` (None: never), then (most similar first)
    while more than `max_speakers` labels are left.
    `unmeasured` labels (no centroid: they never talked alone long enough) count towards the limit but
    are never merged. Two `named` labels never merge; a named label absorbs an unnamed one.
    """
    clusters = {label: (vector.astype(np.float64), float(weight)) for label, (vector, weight) in centroids.items()}
    owner = {label: label for label in centroids}
    while len(clusters) > 1:
        pair, similarity = most_similar_pair(clusters, named)
        if pair is None:
            break
        left = len(clusters) + unmeasured
        over_max = max_speakers is not None and left > max_speakers
        if not over_max and (threshold is None or similarity < threshold):
            break
        keep, drop = pair if pair[0] in named or pair[1] not in named else pair[::-1]
        (a, wa), (b, wb) = clusters[keep], clusters.pop(drop)
        merged = a * wa + b * wb
        clusters[keep] = (merged / max(np.linalg.norm(merged), 1e-12), wa + wb)
        for label, current in owner.items():
            if current == drop:
                owner[label] = keep
    return owner


def most_similar_pair(clusters: dict[str, tuple[np.ndarray, float]], named: frozenset[str]
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


def merge_by_voice(turns: Sequence[Turn], voices: Voices, params: MergeParams,
                   max_speakers: int | None = None, named: frozenset[str] = frozenset()) -> list[Turn]:
    """`turns` with labels merged by `merge_labels`, each label's voice taken without the frames whose
    window reaches over a change of speaker."""
    centroids = mean_voices(voices, solo_interior_frames(turns, voices, params.min_stretch_seconds))
    unmeasured = {t.speaker for t in turns} - set(centroids)
    owner = merge_labels(centroids, params.threshold, max_speakers, named, unmeasured=len(unmeasured))
    return [Turn(t.start, t.end, owner.get(t.speaker, t.speaker)) for t in turns]
