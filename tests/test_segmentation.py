"""The segmentation-3.0 front end: window layout, frame grid, aggregation, determinism, resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_utterance
from nanodrz.errors import NanodrzError
from nanodrz.segmentation import (POWERSET, FrameTrack, SegmentationFrontEnd, SegmentationSettings,
                                  powerset_permutation, to_multilabel)

SAMPLE_RATE = 16000
FRAME_STEP = 270 / SAMPLE_RATE  # SincNet's hop
FIRST_CENTRE = 991 / SAMPLE_RATE / 2  # half its receptive field


@pytest.fixture(scope="module")
def front_end():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SegmentationFrontEnd()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech():
    """1 s of silence, one synthetic utterance, 1 s of silence; and the utterance's speech regions."""
    audio, regions = synthetic_utterance(np.random.default_rng(0), 120.0, 1.0)
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    return np.concatenate([silence, audio, silence]), regions + 1.0


def test_windows_cover_the_recording_and_short_ones_are_padded(front_end):
    assert front_end.frames_per_window == 589
    assert front_end.frame_step == pytest.approx(FRAME_STEP)
    assert front_end.first_centre == pytest.approx(FIRST_CENTRE)
    assert front_end.window_starts(3 * SAMPLE_RATE, 5.0).tolist() == [0]
    assert front_end.window_starts(10 * SAMPLE_RATE, 5.0).tolist() == [0]
    assert front_end.window_starts(12 * SAMPLE_RATE, 5.0).tolist() == [0, 5 * SAMPLE_RATE]
    assert front_end.window_starts(20 * SAMPLE_RATE, 5.0).tolist() == [0, 5 * SAMPLE_RATE, 10 * SAMPLE_RATE]
    assert front_end.window_starts(12 * SAMPLE_RATE, 1.0).tolist() == [s * SAMPLE_RATE for s in (0, 1, 2)]


def test_frame_track_shapes_and_grid(front_end, speech):
    audio, _ = speech
    track = front_end(np.concatenate([audio, audio]))
    seconds = 2 * len(audio) / SAMPLE_RATE
    assert track.powerset.shape == (int(np.ceil((seconds - FIRST_CENTRE) / FRAME_STEP)), len(POWERSET))
    assert track.powerset.dtype == np.float32
    np.testing.assert_allclose(track.powerset.sum(1), 1.0, atol=1e-4)
    assert track.centres()[-1] < seconds <= track.centres()[-1] + FRAME_STEP
    np.testing.assert_allclose(track.speaker_count.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(track.speech, 1.0 - track.speaker_count[:, 0], atol=1e-6)
    short = front_end(audio[:3 * SAMPLE_RATE])
    assert short.powerset.shape == (int(np.ceil((3.0 - FIRST_CENTRE) / FRAME_STEP)), len(POWERSET))


def test_ten_seconds_is_exactly_one_window_and_runs_are_deterministic(front_end, speech):
    audio, _ = speech
    ten = np.resize(audio, 10 * SAMPLE_RATE)
    starts, windows = front_end.windows(ten)
    track = front_end(ten)
    assert starts.tolist() == [0]
    np.testing.assert_array_equal(track.powerset, windows[0])
    np.testing.assert_array_equal(front_end(ten).powerset, track.powerset)


def test_speech_is_found_and_silence_is_not(front_end, speech):
    audio, regions = speech
    track = front_end(audio)
    centres = track.centres()
    inside = np.zeros(len(centres), dtype=bool)
    for start, end in regions:
        inside |= (centres >= start) & (centres < end)
    assert track.speech[inside].mean() > 0.9
    assert track.speech[centres < 0.8].mean() < 0.3  # leading silence (window edges blur it a little)
    assert front_end(np.zeros(4 * SAMPLE_RATE, dtype=np.float32)).speech.max() < 0.05


def test_callers_thread_count_is_kept(front_end, speech):
    torch.set_num_threads(1)
    front_end(speech[0])
    assert torch.get_num_threads() == 1


def test_resampling_to_the_model_frame_rate():
    values = np.zeros((100, len(POWERSET)), dtype=np.float32)
    values[:51, 0] = 1.0  # non-speech for the first 0.51 s
    values[51:, 1] = 1.0
    track = FrameTrack(values, 0.01, 0.005)  # frames [0, 10 ms), [10, 20 ms), ...
    resampled = track.resampled(25.0)
    assert resampled.powerset.shape == (25, len(POWERSET))
    assert resampled.step == 0.04 and resampled.first_centre == 0.0
    np.testing.assert_allclose(resampled.powerset.sum(1), 1.0, atol=1e-6)
    # Frame k covers [40k - 20, 40k + 20) ms: frame 13, [0.50, 0.54) s, holds 10 ms of silence and 30 of speech.
    np.testing.assert_allclose(resampled.speech[:13], 0.0, atol=1e-6)
    np.testing.assert_allclose(resampled.speech[14:], 1.0, atol=1e-6)
    assert resampled.speech[13] == pytest.approx(0.75, abs=1e-5)
    assert FrameTrack(values, 0.01, 0.0).resampled(100.0).powerset == pytest.approx(values, abs=1e-6)  # same grid
    assert track.resampled(25.0, num_frames=40).powerset[30:] == pytest.approx(values[-1:].repeat(10, 0))
    with pytest.raises(NanodrzError):
        track.resampled(0.0)


def test_powerset_renumbering():
    assert powerset_permutation((0, 1, 2)) == list(range(len(POWERSET)))
    swap = powerset_permutation((1, 0, 2))  # speakers 0 and 1 trade numbers
    assert [POWERSET[swap[index]] for index in range(len(POWERSET))] == [(), (1,), (0,), (2,), (0, 1), (1, 2), (0, 2)]
    probabilities = np.random.default_rng(1).dirichlet(np.ones(len(POWERSET)), size=5)
    renumbered = probabilities[:, np.argsort(swap)]
    np.testing.assert_allclose(to_multilabel(renumbered), to_multilabel(probabilities)[:, [1, 0, 2]])


def test_bad_input_and_settings_are_user_errors(front_end):
    with pytest.raises(NanodrzError):
        front_end(np.zeros((2, SAMPLE_RATE), dtype=np.float32))
    with pytest.raises(NanodrzError):
        front_end(np.zeros(0, dtype=np.float32))
    with pytest.raises(NanodrzError):
        front_end(np.full(SAMPLE_RATE, np.nan, dtype=np.float32))
    with pytest.raises(NanodrzError):
        SegmentationSettings(step_seconds=0.0)
    with pytest.raises(NanodrzError):
        SegmentationSettings(step_seconds=11.0)
