"""The baselines: the senko wrapper (a clear error without senko, a real offline run on the pyannote sample),
and the pyannote-3.1-like pipeline (clustering, reconstruction, a real offline run on the sample)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodrz.annotation import read_rttm
from nanodrz.audio import SAMPLE_RATE
from nanodrz.baseline import (PyannoteBaseline, PyannoteSettings, SenkoBaseline, WindowedSpeakers, cluster_embeddings,
                              frames_to_turns, measure_real_time_factor, read_mono)
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


# --------------------------------------------------------------------------------------------------
# The pyannote-3.1-like baseline


@pytest.fixture(scope="module")
def pyannote_baseline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PyannoteBaseline()
    torch.set_num_threads(threads)


def voices(rng: np.random.Generator, centre: np.ndarray, count: int, spread: float = 0.15) -> np.ndarray:
    """`count` unit vectors scattered around `centre`."""
    vectors = centre + spread * rng.standard_normal((count, len(centre))) / np.sqrt(len(centre))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_clustering_finds_the_voices_and_folds_small_clusters():
    rng = np.random.default_rng(0)
    axes = np.eye(16)
    embeddings = np.concatenate([voices(rng, axes[0], 30), voices(rng, axes[1], 25), voices(rng, axes[2], 20)])
    clusters = cluster_embeddings(embeddings, threshold=0.7, min_cluster_size=12)
    assert len(set(clusters)) == 3
    assert [len(set(clusters[a:b])) for a, b in ((0, 30), (30, 55), (55, 75))] == [1, 1, 1]
    # Two stray embeddings near voice 0 but not close enough to merge: folded into voice 0's cluster.
    strays = voices(rng, axes[0] + 0.9 * axes[5], 2, spread=0.01)
    folded = cluster_embeddings(np.concatenate([embeddings, strays]), threshold=0.7, min_cluster_size=12)
    assert len(set(folded)) == 3 and set(folded[-2:]) == {folded[0]}
    assert len(set(cluster_embeddings(embeddings, threshold=2.0, min_cluster_size=12))) == 1
    assert cluster_embeddings(embeddings[:1], threshold=0.7, min_cluster_size=12).tolist() == [0]


def test_frames_become_turns_labelled_in_order_of_first_speech():
    speaking = np.zeros((10, 2), dtype=bool)
    speaking[2:5, 1] = True
    speaking[4:10, 0] = True
    turns = frames_to_turns(speaking, step=0.1, first_centre=0.05, duration=0.95)
    assert [(round(t.start, 6), round(t.end, 6), t.speaker) for t in turns] == [
        (0.2, 0.5, "SPEAKER_01"), (0.4, 0.95, "SPEAKER_02")]


def test_reconstruction_follows_clusters_and_the_local_count(pyannote_baseline):
    """Two 10 s windows 1 s apart; window 0 has voices A (local 0) and B (local 1) overlapping on frames
    200-300; window 1 has B as local 2 and A as local 0. The turns must show two speakers and the overlap."""
    rng = np.random.default_rng(1)
    a, b = voices(rng, np.eye(192)[0], 2, 0.05), voices(rng, np.eye(192)[1], 2, 0.05)
    frames = pyannote_baseline.segmentation.frames_per_window
    activity = np.zeros((2, frames, 3), dtype=np.float32)
    activity[0, 0:300, 0] = activity[0, 200:500, 1] = 1
    shift = pyannote_baseline.segmentation.window_offset(SAMPLE_RATE)
    activity[1, 0:300 - shift, 0] = activity[1, 200 - shift:500 - shift, 2] = 1
    embeddings = np.zeros((2, 3, 192), dtype=np.float32)
    embeddings[0, 0], embeddings[0, 1], embeddings[1, 0], embeddings[1, 2] = a[0], b[0], a[1], b[1]
    speakers = WindowedSpeakers(np.array([0, SAMPLE_RATE]), activity, embeddings, activity.any(1),
                                pyannote_baseline.segmentation.window_offset(SAMPLE_RATE) + frames, 11.0)
    turns = pyannote_baseline.turns(speakers, PyannoteSettings(threshold=0.5, min_cluster_size=1))
    step, centre = pyannote_baseline.segmentation.frame_step, pyannote_baseline.segmentation.first_centre
    assert [t.speaker for t in turns] == ["SPEAKER_01", "SPEAKER_02"]
    assert turns[0].start == pytest.approx(centre - 0.5 * step) and turns[0].end == pytest.approx(centre + 299.5 * step)
    assert turns[1].start == pytest.approx(centre + 199.5 * step) and turns[1].end == pytest.approx(centre + 499.5 * step)
    one = pyannote_baseline.turns(speakers, PyannoteSettings(threshold=2.0, min_cluster_size=1))
    assert {t.speaker for t in one} == {"SPEAKER_01"}


def test_pyannote_baseline_diarizes_the_sample_offline(monkeypatch, pyannote_baseline):
    def no_network(*args, **kwargs):
        raise AssertionError("the baseline tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    speakers = pyannote_baseline.windowed_speakers(read_mono(SAMPLE / "sample.wav"))
    hypothesis = pyannote_baseline.turns(speakers)
    assert torch.get_num_threads() == 1
    assert hypothesis and all(0 <= turn.start < turn.end <= 30.01 for turn in hypothesis)
    # How many speakers the default threshold makes is a benchmark, not a test (at 0.65 it merges the two
    # speakers of this call); a tighter threshold tells them apart.
    tight = pyannote_baseline.turns(speakers, PyannoteSettings(threshold=0.35))
    assert len({turn.speaker for turn in tight}) >= 2
    # With the two speakers apart, speech and overlap are found almost exactly.
    errors = score(read_rttm(SAMPLE / "sample.rttm"), {"sample": tight}).total.at(0.0).to_dict()
    assert errors["missed"] + errors["false_alarm"] < 0.06
    assert pyannote_baseline(np.zeros(3 * SAMPLE_RATE, dtype=np.float32)) == []


def test_pyannote_baseline_rejects_bad_input_and_settings(pyannote_baseline):
    with pytest.raises(NanodrzError):
        pyannote_baseline(np.zeros((2, SAMPLE_RATE), dtype=np.float32))
    for bad in (dict(threshold=0.0), dict(min_cluster_size=0), dict(min_clean_seconds=-1.0),
                dict(embedding_layer="stats")):
        with pytest.raises(NanodrzError):
            PyannoteSettings(**bad)


def test_embedding_layers_are_cam_plus_plus_head_stages(pyannote_baseline):
    """The default ends in senko's ReLU (no negative component); batchnorm stops before it, so the ReLU output
    is its positive part; linear skips the normalisation too (a different direction)."""
    rng = np.random.default_rng(2)
    features = torch.from_numpy(rng.standard_normal((200, 512)).astype(np.float32)).abs()
    weights = torch.zeros(200, 3)
    weights[:120, 0] = weights[80:, 1] = 1
    encoder = pyannote_baseline.encoder
    layers = {}
    for layer in ("relu", "batchnorm", "linear"):
        baseline = PyannoteBaseline.__new__(PyannoteBaseline)
        baseline.settings, baseline.encoder = PyannoteSettings(embedding_layer=layer), encoder
        layers[layer] = baseline.pooled_embeddings(features, weights)
    assert pyannote_baseline.settings.embedding_layer == "relu"
    assert (layers["relu"] >= 0).all() and (layers["batchnorm"][:2] < 0).any()
    positive = np.maximum(layers["batchnorm"], 0)
    positive[:2] /= np.linalg.norm(positive[:2], axis=1, keepdims=True)
    np.testing.assert_allclose(layers["relu"], positive, atol=1e-5)
    assert np.abs(layers["linear"][:2] - layers["batchnorm"][:2]).max() > 0.01
    assert not layers["relu"][2].any()
