"""Split the one label that carries almost all speech, when something says it holds two voices.

The model most often misses a second speaker altogether when two voices are alike (the telephone
speakers of the real pyannote sample: cosine 0.85 between their voices). Splitting every label at a
low cosine would split single speakers too; this rule acts only on a dominant label, and only on
evidence: its voice blocks fall into two clearly different groups, or the overlap head is sure that two
voices talk at once somewhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.params import RefineParams, SplitParams
from nanodrz.postprocess.refine import reassign_single_speaker_stretches, split_labels, two_voices, voice_blocks
from nanodrz.postprocess.resegment import FrameCounts, overlapped_seconds
from nanodrz.postprocess.voices import Voices, elementary_pieces, speech_seconds


def dominant_label_voices(turns: Sequence[Turn], voices: Voices, refine: RefineParams
                          ) -> tuple[str, float, float, float] | None:
    """For the label with the most written speech: (label, its share of all written speech, the cosine
    of its two voices by 2-means on its blocks, the seconds of the smaller group); None when there is no
    speech or that label has too few blocks."""
    speech = speech_seconds(turns)
    if not speech:
        return None
    dominant = max(speech, key=speech.get)
    blocks = voice_blocks(elementary_pieces(turns, [0.0] * len(turns)), voices, refine).get(dominant, [])
    if len(blocks) < refine.min_blocks:
        return None
    _, similarity, seconds = two_voices(blocks, voices.frame_rate)
    return dominant, speech[dominant] / sum(speech.values()), similarity, min(seconds)


def one_voice_heard_as_two(turns: Sequence[Turn], voices: Voices, counts: FrameCounts | None,
                           overlap_threshold: float | None, params: SplitParams, refine: RefineParams) -> bool:
    """The dominant label carries at least `params.dominant_share` of the written speech, and either its
    voice groups are clearly different, or the overlap head's `counts` are sure of enough overlap and the
    groups are not near copies (`SplitParams`)."""
    found = dominant_label_voices(turns, voices, refine)
    if found is None or found[1] < params.dominant_share:
        return False
    _, _, similarity, smaller = found
    if params.two_voice_cosine is not None and similarity < params.two_voice_cosine \
            and smaller >= params.two_voice_seconds:
        return True
    heard = counts is not None and overlap_threshold is not None and overlapped_seconds(
        counts.probabilities, counts.frame_rate, overlap_threshold) >= params.overlap_evidence_seconds
    return heard and params.same_voice_cosine is not None and similarity < params.same_voice_cosine


def split_dominant_label(turns: Sequence[Turn], scores: Sequence[float], voices: Voices, refine: RefineParams,
                         named: frozenset[str] = frozenset()) -> tuple[list[Turn], list[float]]:
    """Two voices for the label with the most speech: its blocks are split by 2-means whatever the cosine
    of the two groups, then single-speaker stretches are re-labelled by voice. No merge follows, since two
    real voices can be as close as the merge threshold. Enrolled (`named`) labels are never split."""
    speech = speech_seconds(turns)
    if not speech:
        return list(turns), list(scores)
    turns, scores = split_label(turns, scores, voices, refine, max(speech, key=speech.get), named)
    return reassign_single_speaker_stretches(turns, scores, voices, refine.switch_penalty)


def split_label(turns: Sequence[Turn], scores: Sequence[float], voices: Voices, refine: RefineParams, label: str,
                named: frozenset[str] = frozenset()) -> tuple[list[Turn], list[float]]:
    """`label`'s blocks split in two by 2-means whatever the cosine of the groups (`split_labels` on that
    label alone), unless it is enrolled or has too few blocks."""
    others = frozenset(t.speaker for t in turns) - {label}
    return split_labels(turns, scores, voices, refine, threshold=np.inf, named=named | others)
