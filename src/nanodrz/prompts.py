"""The prompt layout, shared by training examples (`examples`) and long-form inference (`longform`).

A prompted input is a clip of each known speaker, `PROMPT_GAP_SECONDS` of silence after each, then the
chunk; the prompt triples letter the clips A, B, ... in order. A clip is the clearest stretch where one
speaker talks alone. This module stays light (no simulator), so that diarization starts fast.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE
from nanodrz.tokenizer import letter

PROMPT_GAP_SECONDS = 0.2  # silence between prompt clips: part of the model's input format


def assemble_prompted_input(clips: Sequence[np.ndarray], chunk: np.ndarray,
                            gap: float = PROMPT_GAP_SECONDS) -> tuple[np.ndarray, list[Turn]]:
    """Lay out clip A, `gap` s of silence, clip B, silence, ..., then the chunk (16 kHz).

    Returns the audio and one prompt turn per clip, lettered A, B, ... in clip order.
    """
    gap_samples = np.zeros(int(round(gap * SAMPLE_RATE)), dtype=np.float32)
    pieces, turns, cursor = [], [], 0
    for index, clip in enumerate(clips):
        clip = np.asarray(clip, dtype=np.float32)
        turns.append(Turn(cursor / SAMPLE_RATE, (cursor + len(clip)) / SAMPLE_RATE, letter(index)))
        pieces += [clip, gap_samples]
        cursor += len(clip) + len(gap_samples)
    pieces.append(np.asarray(chunk, dtype=np.float32))
    return np.concatenate(pieces), turns


# --- interval helpers (lists of (start, end) in seconds, sorted) ----------------------------------
def _merge(intervals: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _subtract(intervals: list[tuple[float, float]], cuts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    result = []
    for start, end in intervals:
        pieces = [(start, end)]
        for cut_start, cut_end in cuts:
            pieces = [p for s, e in pieces for p in ((s, min(e, cut_start)), (max(s, cut_end), e)) if p[1] > p[0]]
        result += pieces
    return result


def single_speaker_stretches(turns: Sequence[Turn], speaker: str, excluded: tuple[float, float] | None = None,
                             merge_gap: float = 0.0) -> list[tuple[float, float]]:
    """Where `speaker` talks and nobody else does, outside the `excluded` window (if any)."""
    own = _merge([(t.start, t.end) for t in turns if t.speaker == speaker], merge_gap)
    others = [(t.start, t.end) for t in turns if t.speaker != speaker]
    return _subtract(own, others + ([excluded] if excluded else []))
