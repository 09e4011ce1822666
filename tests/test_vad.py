"""Speech regions from the VAD on signals whose truth is known."""

import numpy as np
import pytest

from nanodrz.vad import speech_regions, split_at_pauses, trim_silence

SAMPLE_RATE = 16000


def harmonic_burst(seconds: float, f0: float = 140.0) -> np.ndarray:
    """A buzzy vowel-like tone (20 harmonics), which the WebRTC VAD takes for speech."""
    time = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.05 * sum(np.sin(2 * np.pi * f0 * k * time) / k for k in range(1, 21))).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def test_a_long_gap_splits_and_a_short_gap_does_not():
    audio = np.concatenate([silence(0.5), harmonic_burst(1.0), silence(0.5), harmonic_burst(1.0), silence(0.1),
                            harmonic_burst(1.0), silence(0.5)])
    regions = speech_regions(audio)
    assert regions.shape == (2, 2)
    np.testing.assert_allclose(regions, [[0.5, 1.5], [2.0, 4.1]], atol=0.05)


def test_the_pause_threshold_is_a_parameter():
    audio = np.concatenate([harmonic_burst(1.0), silence(0.5), harmonic_burst(1.0)])
    assert speech_regions(audio, min_pause=0.3).shape[0] == 2
    assert speech_regions(audio, min_pause=0.8).shape[0] == 1


def test_blips_and_silence_give_no_regions():
    assert speech_regions(silence(2.0)).shape == (0, 2)
    assert speech_regions(np.concatenate([silence(1.0), harmonic_burst(0.05), silence(1.0)])).shape == (0, 2)
    assert speech_regions(np.zeros(10, dtype=np.float32)).shape == (0, 2)


def test_trim_keeps_a_margin_around_speech():
    audio = np.concatenate([silence(2.0), harmonic_burst(1.0), silence(3.0)])
    trimmed, regions = trim_silence(audio, speech_regions(audio), margin=0.1)
    assert trimmed.size / SAMPLE_RATE == pytest.approx(1.2, abs=0.05)
    np.testing.assert_allclose(regions, [[0.1, 1.1]], atol=0.05)


def test_long_recordings_are_cut_in_pauses_only():
    parts = []
    for _ in range(8):
        parts += [harmonic_burst(2.0), silence(0.6)]
    audio = np.concatenate(parts)
    regions = speech_regions(audio)
    pieces = split_at_pauses(audio, regions, max_seconds=5.0)
    assert len(pieces) == 4
    assert sum(piece_regions.shape[0] for _, piece_regions in pieces) == regions.shape[0] == 8
    for piece, piece_regions in pieces:
        assert piece.size / SAMPLE_RATE <= 5.0 + 2 * 0.3
        assert piece_regions.min() >= 0.0 and piece_regions.max() <= piece.size / SAMPLE_RATE
        first, last = int(piece_regions[0, 0] * SAMPLE_RATE), int(piece_regions[-1, 1] * SAMPLE_RATE)
        assert np.abs(piece[:max(first - 160, 0)]).max(initial=0.0) == 0.0  # the cut lies in silence
        assert np.abs(piece[last + 160:]).max(initial=0.0) == 0.0


def test_short_recordings_are_not_cut():
    audio = np.concatenate([harmonic_burst(1.0), silence(0.5), harmonic_burst(1.0)])
    regions = speech_regions(audio)
    [(piece, piece_regions)] = split_at_pauses(audio, regions, max_seconds=15.0)
    assert piece is audio and piece_regions is regions
