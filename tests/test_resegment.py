"""Resegmentation by the overlap head's speaker counts: silence cut, missed speech and overlap added."""

from __future__ import annotations

import numpy as np
import pytest

from nanodrz.annotation import Turn
from nanodrz.longform import CountTrack
from nanodrz.params import ResegmentParams
from nanodrz.postprocess.resegment import (add_missed_overlap, add_missed_speech, nearest_speaker, remove_silence,
                               resegment, runs)

RATE = 25.0


def counts_with_overlap(seconds: float, overlapped: list[tuple[float, float]], probability: float = 0.9,
                        silent: tuple[tuple[float, float], ...] = ()) -> np.ndarray:
    """(frames, 3) speaker-count probabilities: one speaker everywhere, two or more in `overlapped`,
    none in `silent`."""
    counts = np.tile(np.array([0.05, 0.9, 0.05], dtype=np.float32), (int(seconds * RATE), 1))
    times = np.arange(len(counts)) / RATE
    for start, end in overlapped:
        inside = (times >= start) & (times < end)
        counts[inside] = [0.05, 0.95 - probability, probability]
    for start, end in silent:
        counts[(times >= start) & (times < end)] = [0.9, 0.05, 0.05]
    return counts


def test_the_second_voice_of_an_overlap_comes_from_the_nearest_turn():
    turns = [Turn(0.0, 5.0, "A"), Turn(5.0, 8.0, "B"), Turn(9.0, 12.0, "C")]
    out, scores = add_missed_overlap(turns, [1.0, 1.0, 1.0], counts_with_overlap(12.0, [(4.0, 5.0)]), RATE, 0.5, 0.12)
    out, scores = [out[i] for i in (0, 3, 1, 2)], [scores[i] for i in (0, 3, 1, 2)]
    assert [t.speaker for t in out] == ["A", "B", "B", "C"]
    # Edges at the head's frame resolution, snapped to a written boundary within a frame.
    assert (out[1].start, out[1].end) == (pytest.approx(4.0, abs=0.021), 5.0)
    assert scores[1] == pytest.approx(0.9)


def test_weak_short_or_already_written_overlap_is_left_alone():
    turns = [Turn(0.0, 5.0, "A"), Turn(4.0, 8.0, "B")]
    written = counts_with_overlap(8.0, [(4.0, 5.0)])
    assert add_missed_overlap(turns, [1.0, 1.0], written, RATE, 0.5, 0.12)[0] == turns
    lone = [Turn(0.0, 5.0, "A"), Turn(5.0, 8.0, "B")]
    weak = counts_with_overlap(8.0, [(4.0, 5.0)], probability=0.4)
    assert add_missed_overlap(lone, [1.0, 1.0], weak, RATE, 0.5, 0.12)[0] == lone
    assert add_missed_overlap(lone, [1.0, 1.0], weak, RATE, threshold=0.3, min_seconds=0.12)[0][1].speaker == "B"
    short = counts_with_overlap(8.0, [(4.0, 4.08)])
    assert add_missed_overlap(lone, [1.0, 1.0], short, RATE, 0.5, 0.12)[0] == lone
    # With one label there is no second voice to add; where nobody is written nothing is added.
    assert add_missed_overlap([Turn(0.0, 5.0, "A")], [1.0], written, RATE, 0.5, 0.12)[0] == [Turn(0.0, 5.0, "A")]
    gap = [Turn(0.0, 3.0, "A"), Turn(6.0, 8.0, "B")]
    assert add_missed_overlap(gap, [1.0, 1.0], counts_with_overlap(8.0, [(4.0, 5.0)]), RATE, 0.5, 0.12)[0] == gap


def test_an_overlap_run_splits_where_the_written_speaker_changes():
    turns = [Turn(0.0, 4.5, "A"), Turn(4.5, 8.0, "B")]
    out, _ = add_missed_overlap(turns, [1.0, 1.0], counts_with_overlap(8.0, [(4.0, 5.0)]), RATE, 0.5, 0.12)
    added = sorted((round(t.start, 2), t.end, t.speaker) for t in out if t not in turns)
    assert added == [(3.98, 4.5, "B"), (4.5, 4.98, "A")]


def test_runs_and_nearest_speaker_by_hand():
    assert runs(np.array([-1, 0, 0, 1, -1, -1, 1])) == [(1, 2), (3, 3), (6, 6)]
    assert runs(np.array([-1, -1])) == []
    turns = [Turn(0.0, 2.0, "A"), Turn(3.0, 4.0, "B"), Turn(6.5, 9.0, "C"), Turn(10.0, 11.0, "B")]
    assert nearest_speaker(turns, 5.0, 6.0, besides="A") == "C"  # 0.5 s from C, 1 s from B
    assert nearest_speaker(turns, 5.0, 6.0, besides="C") == "B"
    assert nearest_speaker(turns, 2.3, 2.4) == "A"
    assert nearest_speaker([Turn(0.0, 1.0, "A")], 2.0, 3.0, besides="A") is None
    # Equally near: the speaker with more speech.
    assert nearest_speaker([Turn(0.0, 1.0, "B"), Turn(3.0, 6.0, "C")], 1.5, 2.5, besides="A") == "C"


def test_silence_is_cut_out_of_written_turns():
    turns = [Turn(0.0, 6.0, "A"), Turn(5.0, 8.0, "B")]
    counts = counts_with_overlap(8.0, [], silent=((2.0, 3.0), (5.5, 5.56)))
    out, scores = remove_silence(turns, [0.9, 0.8], counts, RATE, 0.5, 0.1)
    assert [(t.speaker, round(t.start, 2), round(t.end, 2)) for t in out] == [("A", 0.0, 1.98), ("A", 2.98, 6.0),
                                                                              ("B", 5.0, 8.0)]
    assert scores == [0.9, 0.9, 0.8]  # the 60 ms pause is shorter than a gap
    assert remove_silence(turns, [0.9, 0.8], counts, RATE, threshold=0.95, min_seconds=0.1)[0] == turns


def test_missed_speech_goes_to_the_nearest_speaker():
    turns = [Turn(0.0, 2.0, "A"), Turn(6.0, 8.0, "B")]
    counts = counts_with_overlap(8.0, [], silent=((2.0, 2.5), (3.5, 6.0)))
    out, scores = add_missed_speech(turns, [1.0, 1.0], counts, RATE, 0.5, 0.1)
    assert [(t.speaker, round(t.start, 2), round(t.end, 2)) for t in out] == [("A", 0.0, 2.0), ("B", 6.0, 8.0),
                                                                              ("A", 2.5, 3.5)]
    assert scores[2] == pytest.approx(0.95)
    assert add_missed_speech([], [], counts, RATE, 0.5, 0.1) == ([], [])


def test_resegment_runs_every_step_and_sorts():
    turns = [Turn(0.0, 4.5, "A"), Turn(5.0, 8.0, "B")]
    counts = counts_with_overlap(8.0, [(4.0, 4.5)], probability=0.95, silent=((1.0, 2.0),))
    out, _ = resegment(turns, [1.0, 1.0], counts, RATE, ResegmentParams())
    assert [(t.speaker, round(t.start, 2), round(t.end, 2)) for t in out] == [
        ("A", 0.0, 0.98), ("A", 1.98, 4.5), ("B", 3.98, 4.5), ("B", 4.5, 5.0), ("B", 5.0, 8.0)]
    assert resegment(turns, [1.0, 1.0], counts, RATE, ResegmentParams(speech_threshold=None, overlap_threshold=None))[0] == turns


def test_count_track_places_chunks_at_their_offsets():
    track = CountTrack(RATE)
    track.add(np.tile([0.0, 1.0, 0.0], (50, 1)), 0.0)
    track.add(np.tile([0.0, 0.0, 1.0], (25, 1)), 3.0)
    array = track.counts().probabilities
    assert array.shape == (100, 3)
    assert array[:50, 1].all() and array[75:, 2].all()
    assert (array[50:75] == [1.0, 0.0, 0.0]).all()  # not covered: silence
