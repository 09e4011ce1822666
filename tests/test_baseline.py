"""The senko baseline wrapper: a clear error without senko, and a real offline run on the pyannote sample."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodrz.annotation import read_rttm
from nanodrz.baseline import SenkoBaseline, measure_real_time_factor
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import score

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "pyannote-sample"


def test_missing_senko_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "senko", None)
    with pytest.raises(NanodrzError, match=r"pip install senko==0.2.2"):
        SenkoBaseline()


def test_real_time_factor_is_median_seconds_per_audio_second():
    calls = []

    def diarize(audio):
        calls.append(len(audio))
        return []

    rtf = measure_real_time_factor(diarize, np.zeros(16000 * 2, dtype=np.float32), repeats=3)
    assert len(calls) == 4
    assert 0 <= rtf < 0.05
    with pytest.raises(NanodrzError):
        measure_real_time_factor(diarize, np.zeros(0, dtype=np.float32))


def test_senko_finds_both_speakers_of_the_sample_offline(monkeypatch):
    pytest.importorskip("senko")

    def no_network(*args, **kwargs):
        raise AssertionError("the baseline tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    # The whole 30 s: on its first 15 s (8 s of speech) senko's clustering finds a single speaker.
    # Diarizing it takes about a second once the models are loaded (a few seconds).
    reference = read_rttm(SAMPLE / "sample.rttm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hypothesis = SenkoBaseline(device="cpu")(SAMPLE / "sample.wav")
        assert torch.get_num_threads() == 1, "senko's thread count leaked to the caller"
    finally:
        torch.set_num_threads(threads)
    assert len({turn.speaker for turn in hypothesis}) == 2
    assert all(0 <= turn.start < turn.end <= 30.01 for turn in hypothesis)
    assert score(reference, {"sample": hypothesis}).der(0.0) < 0.40
