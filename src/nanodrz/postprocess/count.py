"""Honour the speaker counts a user gives (`--num-speakers`, `--min-speakers`, `--max-speakers`) once the
automatic rules are done, not inside them.

Held at every step, a count stops the rules at the wrong moment: a spurious label that the merge would
have removed stays because removing it would leave too few, and then the missed second voice cannot be
split off because the count is already full. On validation speakers, given the true count, the pipeline
did worse than when it chose the count itself (`benchmarks/speaker_count.py`). So the rules run as if no
count were given, and then too many labels are merged (most similar voices first) and too few are split
(the label whose two voice groups differ most first), its single-speaker stretches re-labelled by voice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from nanodrz.annotation import Turn
from nanodrz.params import MergeParams, RefineParams
from nanodrz.postprocess.merge import merge_by_voice
from nanodrz.postprocess.refine import reassign_single_speaker_stretches, two_voices, voice_blocks
from nanodrz.postprocess.split import split_label
from nanodrz.postprocess.voices import Voices, elementary_pieces


def fit_speaker_count(turns: Sequence[Turn], scores: Sequence[float], voices: Voices, merge: MergeParams,
                      refine: RefineParams, min_speakers: int = 0, max_speakers: int | None = None,
                      named: frozenset[str] = frozenset()) -> tuple[list[Turn], list[float]]:
    """`turns` with at most `max_speakers` labels, and at least `min_speakers` where some label's speech
    can be split in two (a label needs `refine.min_blocks` voice blocks)."""
    turns, scores = list(turns), list(scores)
    if max_speakers is not None and len({t.speaker for t in turns}) > max_speakers:
        turns = merge_by_voice(turns, voices, merge, max_speakers=max_speakers, named=named)
    # Asked for, a split needs no minimum length on either side: 2-means groups are never empty.
    forced = dataclasses.replace(refine, min_split_seconds=0.0)
    while len(labels := {t.speaker for t in turns}) < min_speakers:
        label = most_divided_label(turns, voices, refine, named)
        if label is None:
            break
        split, split_scores = split_label(turns, scores, voices, forced, label, named)
        if len({t.speaker for t in split}) <= len(labels):
            break
        relabelled = reassign_single_speaker_stretches(split, split_scores, voices, refine.switch_penalty)
        keeps_count = len({t.speaker for t in relabelled[0]}) > len(labels)
        turns, scores = relabelled if keeps_count else (split, split_scores)
    return turns, scores


def most_divided_label(turns: Sequence[Turn], voices: Voices, refine: RefineParams,
                       named: frozenset[str] = frozenset()) -> str | None:
    """The unnamed label whose voice blocks fall into the two least similar groups (2-means), among those
    with at least `refine.min_blocks` blocks; None if there is none."""
    blocks = voice_blocks(elementary_pieces(turns, [0.0] * len(turns)), voices, refine)
    similarity = {label: two_voices(found, voices.frame_rate)[1] for label, found in blocks.items()
                  if label not in named and len(found) >= refine.min_blocks}
    return min(similarity, key=similarity.get) if similarity else None
