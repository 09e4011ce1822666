"""Merging labels by voice after long-form stitching (`nanodrz.relabel`), checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from nanodrz.annotation import Turn
from nanodrz.diarize import DiarizationSettings, merge_threshold_arg, rename_by_first_turn
from nanodrz.errors import NanodrzError
from nanodrz.relabel import VoiceTally, merge_labels


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


CENTROIDS = {"A": (unit(1, 0, 0), 10), "B": (unit(0.95, 0.31, 0), 10), "C": (unit(0, 1, 0), 10),
             "D": (unit(0, 0, 1), 10)}


def test_pairs_at_or_above_the_threshold_merge_into_one_label():
    owner = merge_labels(CENTROIDS, threshold=0.9)
    assert owner == {"A": "A", "B": "A", "C": "C", "D": "D"}
    assert merge_labels(CENTROIDS, threshold=0.99) == {label: label for label in CENTROIDS}


def test_min_speakers_stops_merging_and_max_speakers_forces_it():
    assert merge_labels(CENTROIDS, threshold=0.9, min_speakers=4) == {label: label for label in CENTROIDS}
    # Off by similarity, but at most 2: A+B first (cosine 0.95), then C joins them (closer than D).
    owner = merge_labels(CENTROIDS, threshold=float("inf"), max_speakers=2)
    assert owner == {"A": "A", "B": "A", "C": "A", "D": "D"}
    # Labels without a voice count towards the limit.
    owner = merge_labels(CENTROIDS, threshold=float("inf"), max_speakers=3, unmeasured=1)
    assert sorted(set(owner.values())) == ["A", "D"]


def test_named_speakers_never_merge_with_each_other_and_keep_their_names():
    named = frozenset({"alice", "bob"})
    centroids = {"alice": (unit(1, 0), 5), "bob": (unit(0.99, 0.14), 5), "A": (unit(0.98, 0.2), 5)}
    owner = merge_labels(centroids, threshold=0.9, named=named)
    assert owner["alice"] == "alice" and owner["bob"] == "bob"
    assert owner["A"] == "bob"  # its closest voice; the name wins over the letter


def test_tally_counts_only_frames_whose_window_lies_where_the_label_talks_alone():
    frame_rate = 10.0
    voices = np.eye(80, dtype=np.float32)  # frame t's voice is basis vector t
    turns = [Turn(0.0, 3.0, "A"), Turn(2.0, 5.0, "B"), Turn(5.5, 5.8, "C"), Turn(5.8, 6.8, "D")]
    tally = VoiceTally()
    tally.add(turns, voices, frame_rate)
    # A alone 0-2 s, B alone 3-5 s: frames 0.75 s inside each end; C (0.3 s) is too short to count;
    # D (1 s) is shorter than a window: its middle frame only.
    assert np.flatnonzero(tally.sums["A"]).tolist() == list(range(8, 13))
    assert np.flatnonzero(tally.sums["B"]).tolist() == list(range(38, 43))
    assert "C" not in tally.sums
    assert np.flatnonzero(tally.sums["D"]).tolist() == [63]
    assert tally.counts == {"A": 5, "B": 5, "D": 1}
    # Frames are on the input's time line: a prompt of 1 s before the chunk shifts them.
    shifted = VoiceTally()
    shifted.add([Turn(0.0, 2.0, "A")], voices, frame_rate, offset=-1.0)
    assert np.flatnonzero(shifted.sums["A"]).tolist() == list(range(18, 23))
    centroid, count = tally.centroids()["A"]
    assert count == 5 and np.linalg.norm(centroid) == pytest.approx(1.0)


def test_labels_are_renamed_by_first_turn_and_names_kept():
    turns = [Turn(3.0, 4.0, "D"), Turn(0.0, 1.0, "C"), Turn(1.0, 2.0, "alice"), Turn(5.0, 6.0, "C")]
    renamed = rename_by_first_turn(turns, frozenset({"alice"}))
    assert [t.speaker for t in renamed] == ["B", "A", "alice", "A"]
    assert [t.speaker for t in rename_by_first_turn([Turn(0, 1, "E")], frozenset({"A"}))] == ["B"]


def test_threshold_setting_and_argument():
    assert merge_threshold_arg("off") == float("inf") and merge_threshold_arg("0.7") == 0.7
    with pytest.raises(NanodrzError, match="merge-threshold"):
        DiarizationSettings(merge_threshold=-2.0)
    with pytest.raises(NanodrzError, match="merge-threshold"):
        DiarizationSettings(merge_threshold=float("nan"))
