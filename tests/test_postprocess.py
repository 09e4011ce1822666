"""The post-processing rules (`nanodrz.postprocess`) on hand-made voices, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from nanodrz.annotation import Turn
from nanodrz.errors import NanodrzError
from nanodrz.params import AbsorbParams, MergeParams, PipelineParams, RefineParams, SplitParams
from nanodrz.postprocess.absorb import absorb_small_labels
from nanodrz.postprocess.count import fit_speaker_count, most_divided_label
from nanodrz.postprocess.merge import merge_labels
from nanodrz.postprocess.refine import best_voice_path, reassign_single_speaker_stretches, refine_labels, split_labels
from nanodrz.postprocess.resegment import FrameCounts
from nanodrz.postprocess.split import dominant_label_voices, one_voice_heard_as_two, split_dominant_label
from nanodrz.postprocess.stitch import drop_short_islands, rename_by_first_turn
from nanodrz.postprocess.voices import (Voices, VoiceTrack, elementary_pieces, mean_voices, solo_interior_frames,
                                        speech_seconds)

REFINE, MERGE = RefineParams(), MergeParams()


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


CENTROIDS = {"A": (unit(1, 0, 0), 10), "B": (unit(0.95, 0.31, 0), 10), "C": (unit(0, 1, 0), 10),
             "D": (unit(0, 0, 1), 10)}


def test_pairs_at_or_above_the_threshold_merge_into_one_label():
    owner = merge_labels(CENTROIDS, threshold=0.9)
    assert owner == {"A": "A", "B": "A", "C": "C", "D": "D"}
    assert merge_labels(CENTROIDS, threshold=0.99) == {label: label for label in CENTROIDS}


def test_max_speakers_forces_merging():
    # Off by similarity, but at most 2: A+B first (cosine 0.95), then C joins them (closer than D).
    owner = merge_labels(CENTROIDS, threshold=None, max_speakers=2)
    assert owner == {"A": "A", "B": "A", "C": "A", "D": "D"}
    # Labels without a voice count towards the limit.
    owner = merge_labels(CENTROIDS, threshold=None, max_speakers=3, unmeasured=1)
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
    found = mean_voices(Voices(voices, frame_rate, 1.5), solo_interior_frames(turns, Voices(voices, frame_rate, 1.5),
                                                                               min_stretch_seconds=0.5))
    # A alone 0-2 s, B alone 3-5 s: frames 0.75 s inside each end; C (0.3 s) is too short to count;
    # D (1 s) is shorter than a window: its middle frame only.
    assert np.flatnonzero(found["A"][0]).tolist() == list(range(8, 13))
    assert np.flatnonzero(found["B"][0]).tolist() == list(range(38, 43))
    assert "C" not in found
    assert np.flatnonzero(found["D"][0]).tolist() == [63]
    assert {label: count for label, (_, count) in found.items()} == {"A": 5, "B": 5, "D": 1}
    assert np.linalg.norm(found["A"][0]) == pytest.approx(1.0)


def test_labels_are_renamed_by_first_turn_and_names_kept():
    turns = [Turn(3.0, 4.0, "D"), Turn(0.0, 1.0, "C"), Turn(1.0, 2.0, "alice"), Turn(5.0, 6.0, "C")]
    renamed = rename_by_first_turn(turns, frozenset({"alice"}))
    assert [t.speaker for t in renamed] == ["B", "A", "alice", "A"]
    assert [t.speaker for t in rename_by_first_turn([Turn(0, 1, "E")], frozenset({"A"}))] == ["B"]


def test_short_islands_of_speech_are_dropped_and_runs_of_turns_kept():
    turns = [Turn(0.0, 0.3, "A"), Turn(0.2, 0.5, "B"),  # island of 0.5 s: dropped
             Turn(5.0, 5.3, "A"), Turn(5.8, 6.2, "B"),  # two short turns 0.5 s apart: one island of 0.7 s
             Turn(9.0, 9.4, "A")]  # alone: dropped
    kept, scores = drop_short_islands(turns, [1, 2, 3, 4, 5], min_seconds=0.6, gap_seconds=2.0)
    assert kept == turns[2:4] and scores == [3, 4]
    assert drop_short_islands(turns, [1, 2, 3, 4, 5], min_seconds=0.0, gap_seconds=2.0)[0] == turns
    assert drop_short_islands(turns, [1, 2, 3, 4, 5], min_seconds=0.6, gap_seconds=3.0)[0] == turns[2:]


def test_parameters_are_checked_where_they_are_declared():
    for bad in (-2.0, float("nan"), 1.5):
        with pytest.raises(NanodrzError, match="merge.threshold"):
            MergeParams(threshold=bad)
    with pytest.raises(NanodrzError, match="refine.passes"):
        RefineParams(passes=-1)
    with pytest.raises(NanodrzError, match="unknown pipeline parameter"):
        PipelineParams().with_values({"merge.treshold": 0.8})
    assert PipelineParams().with_values({"merge.threshold": None}).merge.threshold is None
    assert PipelineParams.from_dict(PipelineParams().to_dict()) == PipelineParams()


# --- re-labelling single-speaker stretches by voice -------------------------------------------------
FRAME_RATE = 10.0


def V(track: np.ndarray) -> Voices:
    """A hand-made track as a recording's voices (1.5 s windows, as the model's)."""
    return Voices(track, FRAME_RATE, 1.5)


def two_voice_track(changes: list[tuple[float, int]], seconds: float, size: int = 4) -> np.ndarray:
    """(frames, size) one-hot voices: voice v from each (time, v) in `changes` until the next."""
    track = np.zeros((int(seconds * FRAME_RATE), size), dtype=np.float32)
    for (start, voice), (end, _) in zip(changes, changes[1:] + [(seconds, -1)]):
        track[int(round(start * FRAME_RATE)):int(round(end * FRAME_RATE)), voice] = 1.0
    return track


def test_best_voice_path_pays_for_each_change_of_voice():
    similarity = np.array([[1.0, 1.0, 0.0, 1.0, 1.0],
                           [0.0, 0.0, 0.6, 0.0, 0.0]])
    # A one-frame detour gains 0.6 and costs two changes.
    assert best_voice_path(similarity, switch_penalty=0.25).tolist() == [0, 0, 1, 0, 0]
    assert best_voice_path(similarity, switch_penalty=0.5).tolist() == [0, 0, 0, 0, 0]


def test_elementary_pieces_cut_the_time_line_at_every_boundary():
    pieces = elementary_pieces([Turn(0, 2, "A"), Turn(1, 3, "B"), Turn(3, 4, "A"), Turn(5, 5, "C"),
                                Turn(3.5, 4, "A")], [0.9, 0.8, 0.7, 0.6, 0.95])
    # A label written twice over the same time counts once, with its best score.
    assert pieces == [(0, 1, [("A", 0.9)]), (1, 2, [("A", 0.9), ("B", 0.8)]), (2, 3, [("B", 0.8)]),
                      (3, 3.5, [("A", 0.7)]), (3.5, 4, [("A", 0.95)])]


def test_a_turn_that_runs_over_a_change_of_voice_is_split_there():
    # The model wrote A for 0-4 s, but voice 1 takes over at 2 s; B (voice 1) talks again at 5-6 s.
    track = two_voice_track([(0.0, 0), (2.0, 1), (4.0, 2), (5.0, 1), (6.0, 2)], 7.0)
    turns = [Turn(0.0, 4.0, "A"), Turn(5.0, 6.0, "B")]
    new_turns, new_scores = reassign_single_speaker_stretches(turns, [0.9, 0.8], V(track), 0.25)
    assert [(t.speaker, t.start, t.end) for t in new_turns] == [("A", 0.0, 1.95), ("B", 1.95, 4.0),
                                                              ("B", 5.0, 6.0)]
    # Each piece keeps the score of the written turn it came from.
    assert new_scores == [0.9, 0.9, 0.8]


def test_stretches_where_the_model_wrote_two_voices_are_kept():
    track = two_voice_track([(0.0, 0), (2.0, 1)], 4.0)
    turns = [Turn(0.0, 3.0, "A"), Turn(1.0, 4.0, "B")]
    new_turns, _ = reassign_single_speaker_stretches(turns, [1.0, 1.0], V(track), 0.25)
    assert sorted((t.speaker, t.start, t.end) for t in new_turns) == [("A", 0.0, 1.0), ("A", 1.0, 3.0),
                                                                      ("B", 1.0, 3.0), ("B", 3.0, 4.0)]


def test_refinement_merges_labels_whose_voices_match():
    # C is voice 0 again, written as a new speaker: the pass re-labels and merging folds it into A.
    track = two_voice_track([(0.0, 0), (3.0, 1), (6.0, 0)], 9.0)
    turns = [Turn(0.0, 3.0, "A"), Turn(3.0, 6.0, "B"), Turn(6.0, 9.0, "C")]
    refined, _ = refine_labels(turns, [1.0] * 3, V(track), REFINE, MERGE)
    assert {t.speaker for t in refined} == {"A", "B"}
    # B's second half is an enrolled speaker's voice: it takes the name.
    turns = [Turn(0.0, 3.0, "alice"), Turn(3.0, 9.0, "B")]
    refined, _ = refine_labels(turns, [1.0] * 2, V(track), REFINE, MERGE, named=frozenset({"alice"}))
    refined = rename_by_first_turn(refined, frozenset({"alice"}))
    assert [(t.speaker, t.start, t.end) for t in refined] == [("alice", 0.0, 3.0), ("A", 3.0, 5.95),
                                                               ("alice", 5.95, 9.0)]


def test_a_speaker_count_asked_for_splits_the_most_divided_label_or_merges_the_closest_voices():
    # "A" holds two voices at cosine 0.85 (too close for the automatic split at 0.7); "B" holds one.
    first, second = unit(1, 0, 0, 0), unit(0.85, float(np.sqrt(1 - 0.85 ** 2)), 0, 0)
    track = np.zeros((int(15.0 * FRAME_RATE), 4), dtype=np.float32)
    track[:int(4.5 * FRAME_RATE)], track[int(4.5 * FRAME_RATE):int(9 * FRAME_RATE)] = first, second
    track[int(9 * FRAME_RATE):] = unit(0, 0, 1, 0)
    turns, scores = [Turn(0.0, 9.0, "A"), Turn(9.0, 15.0, "B")], [0.5, 0.5]
    assert most_divided_label(turns, V(track), REFINE) == "A"
    split, split_scores = fit_speaker_count(turns, scores, V(track), MERGE, REFINE, min_speakers=3)
    assert len({t.speaker for t in split}) == 3 and len(split_scores) == len(split)
    assert [t for t in split if t.speaker == "B"] == turns[1:]
    change = [t.end for t in split if t.start == 0.0][0]
    assert change == pytest.approx(4.5, abs=0.05)
    # Too many: the two closest voices become one label, the third stays.
    merged, _ = fit_speaker_count(split, split_scores, V(track), MERGE, REFINE, max_speakers=2)
    assert [t.speaker for t in merged if t.start < 9.0] == ["A"] * len([t for t in merged if t.start < 9.0])
    assert {t.speaker for t in merged} == {"A", "B"}
    # Met already, or not reachable (no label with enough voice blocks): unchanged.
    assert fit_speaker_count(turns, scores, V(track), MERGE, REFINE, 2, 2) == (turns, scores)
    assert fit_speaker_count(turns, scores, V(track), MERGE, REFINE, min_speakers=3,
                             named=frozenset({"A"}))[0] == turns


def test_a_label_holding_two_clearly_different_voices_is_split():
    # One letter for two voices (4.5 s and 3 s, five blocks of 1.5 s): the smaller group gets a new label.
    track = two_voice_track([(0.0, 0), (4.5, 1)], 7.5)
    split, scores = split_labels([Turn(0.0, 7.5, "A")], [0.5], V(track), REFINE, 0.7)
    assert [(t.speaker, t.start, t.end) for t in split] == [("A", 0.0, 4.5), ("~1", 4.5, 6.0), ("~1", 6.0, 7.5)]
    assert scores == [0.5, 0.5, 0.5]
    # Not when a side is too short, or for an enrolled name.
    short = two_voice_track([(0.0, 0), (6.0, 1)], 7.0)
    assert split_labels([Turn(0.0, 7.0, "A")], [0.5], V(short), REFINE, 0.7)[0] == [Turn(0.0, 7.0, "A")]
    named = split_labels([Turn(0.0, 7.0, "alice")], [0.5], V(track), REFINE, 0.7, named=frozenset({"alice"}))[0]
    assert named == [Turn(0.0, 7.0, "alice")]


def test_the_dominant_label_is_split_whatever_its_voices_cosine_when_asked():
    # Two voices at cosine 0.85 under "A": too close for the ordinary split (0.7) or to stay apart after a
    # merge (0.85). A short "B" holding two voices of its own is not the dominant label and stays whole.
    first, second = unit(1, 0, 0, 0), unit(0.85, float(np.sqrt(1 - 0.85 ** 2)), 0, 0)
    track = np.zeros((int(15.0 * FRAME_RATE), 4), dtype=np.float32)
    track[:int(4.5 * FRAME_RATE)], track[int(4.5 * FRAME_RATE):int(9 * FRAME_RATE)] = first, second
    track[int(9 * FRAME_RATE):int(12 * FRAME_RATE)], track[int(12 * FRAME_RATE):] = unit(0, 0, 1, 0), unit(0, 0, 0, 1)
    turns = [Turn(0.0, 9.0, "A"), Turn(9.0, 15.0, "B")]
    assert speech_seconds(turns) == {"A": 9.0, "B": 6.0}
    assert split_labels(turns[:1], [0.5], V(track), REFINE, 0.7)[0] == turns[:1]
    split, scores = split_dominant_label(turns, [0.5, 0.5], V(track), REFINE)
    assert len(split) == 3 and len(scores) == 3 and split[2] == turns[1]
    assert len({split[0].speaker, split[1].speaker, "B"}) == 3
    assert (split[0].start, split[1].end) == (0.0, 9.0) and split[0].end == pytest.approx(4.5, abs=0.05)
    assert split_dominant_label(turns, [0.5, 0.5], V(track), REFINE, named=frozenset({"A"}))[0] == turns
    assert split_dominant_label([], [], V(track), REFINE) == ([], [])


def test_voice_track_keeps_each_chunk_after_its_prompt():
    track = VoiceTrack(frame_rate=10.0, window_seconds=1.5)
    track.add(np.arange(30, dtype=np.float32)[:, None], first=0.0, seconds=2.0)
    # 1 s of prompt, then 1.5 s of chunk; the model's last frame is missing: zero-filled.
    track.add(np.arange(100, 124, dtype=np.float32)[:, None], first=1.0, seconds=1.5)
    assert track.voices().frames[:, 0].tolist() == list(range(20)) + list(range(110, 124)) + [0.0]


def voices_at_cosine(cosine: float) -> np.ndarray:
    """Ten seconds of one voice and then ten of another at `cosine` to it."""
    track = np.zeros((int(20.0 * FRAME_RATE), 4), dtype=np.float32)
    track[:int(10 * FRAME_RATE)] = unit(1, 0, 0, 0)
    track[int(10 * FRAME_RATE):] = unit(cosine, float(np.sqrt(1 - cosine ** 2)), 0, 0)
    return track


def overlap_counts(seconds: float) -> FrameCounts:
    """Twenty seconds of speaker counts, sure of two voices over the first `seconds`."""
    counts = np.tile(np.array([0.0, 1.0, 0.0], dtype=np.float32), (int(20.0 * FRAME_RATE), 1))
    counts[:int(seconds * FRAME_RATE)] = (0.0, 0.02, 0.98)
    return FrameCounts(counts, FRAME_RATE)


def heard_as_two(turns: list[Turn], track: np.ndarray, counts: FrameCounts | None) -> bool:
    """`one_voice_heard_as_two` under the default parameters (overlap threshold 0.8)."""
    return one_voice_heard_as_two(turns, V(track), counts, 0.8, SplitParams(), REFINE)


@pytest.mark.parametrize("cosine, overlap_seconds, expected", [
    (0.80, 0.0, True),  # two clearly different voices under one label: split on voices alone
    (0.90, 0.0, False),  # as close as one voice can drift: kept
    (0.90, 1.0, True),  # ... unless the overlap head hears two voices at once
    (0.97, 1.0, False),  # near copies stay one voice whatever the head hears
])
def test_a_dominant_label_holds_two_voices_by_voice_or_by_heard_overlap(cosine, overlap_seconds, expected):
    turns = [Turn(0.0, 20.0, "A")]
    found = dominant_label_voices(turns, V(voices_at_cosine(cosine)), REFINE)
    assert found[0] == "A" and found[1] == 1.0 and found[2] == pytest.approx(cosine, abs=0.03)
    assert found[3] == pytest.approx(10.0, abs=1.0)  # the block across the change goes to one side
    heard = heard_as_two(turns, voices_at_cosine(cosine), overlap_counts(overlap_seconds))
    assert heard is expected


def test_no_dominant_split_below_the_share_or_for_a_short_second_voice():
    track, counts = voices_at_cosine(0.8), overlap_counts(1.0)
    half = [Turn(0.0, 10.0, "A"), Turn(10.0, 20.0, "B")]
    assert not heard_as_two(half, track, counts)
    whole = [Turn(0.0, 20.0, "A")]
    short = voices_at_cosine(0.8)
    short[:int(18 * FRAME_RATE)] = unit(1, 0, 0, 0)  # the second voice for the last 2 s only
    assert not heard_as_two(whole, short, None)
    assert dominant_label_voices([], V(track), REFINE) is None


def test_a_label_with_little_speech_joins_the_closest_voice():
    track = np.zeros((int(12.0 * FRAME_RATE), 4), dtype=np.float32)
    track[:int(5 * FRAME_RATE)] = unit(1, 0, 0, 0)
    track[int(5 * FRAME_RATE):int(10 * FRAME_RATE)] = unit(0, 1, 0, 0)
    track[int(10 * FRAME_RATE):] = unit(0.2, 0.9, 0.3, 0)  # closer to B's voice than to A's
    turns = [Turn(0.0, 5.0, "A"), Turn(5.0, 10.0, "B"), Turn(10.0, 11.0, "C")]
    assert absorb_small_labels(turns, V(track), AbsorbParams(1.5)) == turns[:2] + [Turn(10.0, 11.0, "B")]
    assert absorb_small_labels(turns, V(track), AbsorbParams(0.5)) == turns
    named = [Turn(0.0, 5.0, "A"), Turn(5.0, 10.0, "B"), Turn(10.0, 11.0, "carol")]
    assert absorb_small_labels(named, V(track), AbsorbParams(1.5), named=frozenset({"carol"})) == named
    # Two small labels: the smaller goes first, and never into a label that has already gone.
    small = [Turn(0.0, 5.0, "A"), Turn(10.0, 11.0, "C"), Turn(10.0, 10.5, "D")]
    assert {t.speaker for t in absorb_small_labels(small, V(track), AbsorbParams(1.5))} == {"A"}
    assert absorb_small_labels([], V(track), AbsorbParams()) == []


def test_pipeline_options_on_the_command_line(tmp_path, capsys):
    from nanodrz.cli import main
    from nanodrz.commandline import parameter_value, read_params_file

    assert [parameter_value(v) for v in ("off", "0.5", "3", "true")] == [None, 0.5, 3, True]
    path = tmp_path / "params.yaml"
    path.write_text("merge: {threshold: 0.8}\nresegment: {speech_threshold: null}\n")
    assert read_params_file(path) == {"merge.threshold": 0.8, "resegment.speech_threshold": None}
    assert PipelineParams().with_values(read_params_file(path)).merge.threshold == 0.8
    audio = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(audio, np.zeros(16000, dtype=np.float32), 16000)
    # Refused before any model loads, in one line.
    for bad in (["--param", "merge.treshold=0.8"], ["--merge-threshold", "2"], ["--params", str(tmp_path / "none.yaml")]):
        assert main(["diarize", str(audio), *bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nanodrz diarize: error:"), lines
