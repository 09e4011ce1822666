"""The last steps: same-speaker turns joined across chunk boundaries, artefacts dropped, labels renamed."""

from __future__ import annotations

from typing import Sequence

from nanodrz.annotation import Turn
from nanodrz.postprocess.voices import written_seconds
from nanodrz.tokenizer import letter


def stitch(turns: Sequence[Turn], scores: Sequence[float], gap: float) -> tuple[list[Turn], list[float]]:
    """Join same-speaker turns that overlap or are less than `gap` apart (e.g. cut by a chunk boundary)."""
    merged: list[Turn] = []
    merged_scores: list[float] = []
    last_of: dict[str, int] = {}
    for turn, score in sorted(zip(turns, scores), key=lambda pair: (pair[0].start, pair[0].end)):
        index = last_of.get(turn.speaker)
        if index is not None and turn.start - merged[index].end < gap:
            previous = merged[index]
            merged[index] = Turn(previous.start, max(previous.end, turn.end), turn.speaker)
            merged_scores[index] = max(merged_scores[index], score)
            continue
        last_of[turn.speaker] = len(merged)
        merged.append(turn)
        merged_scores.append(score)
    order = sorted(range(len(merged)), key=lambda i: (merged[i].start, merged[i].end, merged[i].speaker))
    return [merged[i] for i in order], [merged_scores[i] for i in order]


def drop_shorter_than(turns: Sequence[Turn], scores: Sequence[float], seconds: float
                      ) -> tuple[list[Turn], list[float]]:
    """Turns of at least `seconds` (a turn shorter than two time bins is an artefact, e.g. a turn started
    in a chunk's last bin)."""
    kept = [i for i, turn in enumerate(turns) if turn.end - turn.start >= seconds - 1e-9]
    return [turns[i] for i in kept], [scores[i] for i in kept]


def drop_short_islands(turns: Sequence[Turn], scores: Sequence[float], min_seconds: float, gap_seconds: float
                       ) -> tuple[list[Turn], list[float]]:
    """Turns less than `gap_seconds` apart form an island; an island with less than `min_seconds` of
    written speech is dropped whole. Speech in a conversation comes in runs; a lone blip with silence all
    around is most often a sound the model took for a voice (music, a click)."""
    islands: list[list[int]] = []
    covered_to = float("-inf")
    for i in sorted(range(len(turns)), key=lambda i: (turns[i].start, turns[i].end)):
        if not islands or turns[i].start - covered_to >= gap_seconds:
            islands.append([])
        islands[-1].append(i)
        covered_to = max(covered_to, turns[i].end)
    kept = [i for island in islands if written_seconds([turns[i] for i in island]) >= min_seconds - 1e-9
            for i in island]
    kept.sort(key=lambda i: (turns[i].start, turns[i].end, turns[i].speaker))
    return [turns[i] for i in kept], [scores[i] for i in kept]


def rename_by_first_turn(turns: Sequence[Turn], named: frozenset[str]) -> list[Turn]:
    """Unnamed labels renamed A, B, ... in order of their first turn (names in `named` are kept and
    never reused), so merged labels leave no gaps."""
    names: dict[str, str] = {}
    index = 0
    for turn in sorted(turns, key=lambda t: (t.start, t.end)):
        if turn.speaker in named or turn.speaker in names:
            continue
        while letter(index) in named:
            index += 1
        names[turn.speaker] = letter(index)
        index += 1
    return [Turn(t.start, t.end, names.get(t.speaker, t.speaker)) for t in turns]
