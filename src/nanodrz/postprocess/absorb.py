"""Labels with too little speech join the label whose voice is closest."""

from __future__ import annotations

from typing import Sequence

from nanodrz.annotation import Turn
from nanodrz.params import AbsorbParams
from nanodrz.postprocess.voices import Voices, mean_voices, speech_seconds, turn_frames


def absorb_small_labels(turns: Sequence[Turn], voices: Voices, params: AbsorbParams,
                        named: frozenset[str] = frozenset()) -> list[Turn]:
    """`turns` with every unnamed label of less than `params.min_label_seconds` of speech relabelled as
    the label whose voice is most similar (voices over all of a label's turns, so a label heard only in
    overlap still has one), smallest first, while more than one label is left."""
    speech = speech_seconds(turns)
    label_voices = {label: vector for label, (vector, _) in mean_voices(voices, turn_frames(turns, voices)).items()}
    owner = {label: label for label in speech}
    for label in sorted(speech, key=speech.get):
        alive = {owner[other] for other in speech}
        if (speech[label] >= params.min_label_seconds or label in named or label not in label_voices
                or len(alive) <= 1):
            continue
        others = [other for other in sorted(alive) if other != label and other in label_voices]
        if others:
            target = max(others, key=lambda other: float(label_voices[label] @ label_voices[other]))
            for key, current in owner.items():
                if current == label:
                    owner[key] = target
    return [Turn(t.start, t.end, owner[t.speaker]) for t in turns]
