"""pyannote-style outputs (regular and exclusive diarization, speaker embeddings), in-memory audio, the
progress hook, the output formats of `nanodrz diarize`, and `--workers`.

The API tests use the tone diarizer of test_diarize (tones as voices, one-hot "embeddings"); the
command-line tests use it through a patched loader, and the worker tests the tiny untrained checkpoint,
since spawned workers load their own model.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from pyannote.core import Annotation

from nanodrz.annotation import Turn, read_rttm
from nanodrz.cli import main
from nanodrz.decoding import DecodingResult
from nanodrz.pipeline import Diarizer
from nanodrz.errors import NanodrzError
from nanodrz.outputs import diarize_output
from nanodrz.parallel import lost_groups
from nanodrz.postprocess.voices import VoiceTrack
from test_diarize import TONES, labels_by_voice, tone_audio, tone_decode, tone_diarizer

SR = 16000
REFERENCE = [(0.5, 2.5, 0), (3.0, 5.0, 1), (6.5, 8.0, 0), (8.5, 10.0, 1), (13.0, 15.0, 2)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overlapping_tone_decode(model, audio, prompts, options) -> list[DecodingResult]:
    """The tone decoder, with every turn but the last run 0.6 s into the next one, every other turn
    less sure of itself."""
    results = tone_decode(model, audio, prompts, options)
    for result in results:
        turns = result.turns
        result.turns = [Turn(t.start, max(t.end, turns[i + 1].start + 0.6) if i + 1 < len(turns) else t.end, t.speaker)
                        for i, t in enumerate(turns)]
        result.scores = [0.5 if i % 2 else 0.9 for i in range(len(turns))]
    return results


def solo_speech(annotation: Annotation):
    """label -> the timeline where that label talks and nobody else does."""
    overlap = annotation.get_overlap()
    return {label: annotation.label_timeline(label).support().extrude(overlap) for label in annotation.labels()}


def assert_exclusive_matches(output) -> None:
    regular, flat = output.speaker_diarization, output.exclusive_speaker_diarization
    assert regular.get_overlap().duration() > 0.5, "the test needs overlapped speech"
    assert flat.get_overlap().duration() == 0
    assert flat.get_timeline().support().duration() == pytest.approx(regular.get_timeline().support().duration())
    exclusive_by_label = {label: flat.label_timeline(label).support() for label in flat.labels()}
    for label, alone in solo_speech(regular).items():
        missing = alone.extrude(exclusive_by_label.get(label, alone.__class__()))
        assert missing.duration() == pytest.approx(0.0, abs=1e-6), label


def test_exclusive_diarization_has_no_overlap_and_keeps_single_speaker_speech():
    turns = [Turn(0.0, 3.0, "A"), Turn(2.0, 5.0, "B"), Turn(4.0, 4.5, "C"), Turn(6.0, 7.0, "A")]
    output = diarize_output("x", turns, [0.9, 0.5, 0.8, 0.9], False, None)
    assert_exclusive_matches(output)
    # Overlap goes to the surer turn: A over B at 2-3 s, C over B at 4-4.5 s.
    assert output.exclusive_turns == (Turn(0.0, 3.0, "A"), Turn(3.0, 4.0, "B"), Turn(4.0, 4.5, "C"),
                                      Turn(4.5, 5.0, "B"), Turn(6.0, 7.0, "A"))
    assert output.speaker_embeddings is None and output.labels == ("A", "B", "C")


def test_run_gives_both_diarizations_of_a_recording():
    diarizer = tone_diarizer()
    diarizer.decode_fn = overlapping_tone_decode
    output = diarizer.run(tone_audio(REFERENCE, 16.0), uri="meeting")
    assert output.speaker_diarization.uri == output.exclusive_speaker_diarization.uri == "meeting"
    assert_exclusive_matches(output)


def test_each_label_gets_one_unit_embedding_of_its_own_voice():
    output = tone_diarizer().run(tone_audio(REFERENCE, 16.0))
    labels = output.speaker_diarization.labels()
    assert output.labels == tuple(labels) == ("A", "B", "C")
    assert output.speaker_embeddings.shape == (3, len(TONES))
    np.testing.assert_allclose(np.linalg.norm(output.speaker_embeddings, axis=1), 1.0, atol=1e-5)
    voice_of = {label: voice for voice, found in labels_by_voice(list(output.turns), REFERENCE).items()
                for label in found}
    assert [int(np.argmax(row)) for row in output.speaker_embeddings] == [voice_of[label] for label in labels]


def test_a_label_heard_only_in_overlap_still_gets_a_voice():
    track = VoiceTrack(50.0, window_seconds=1.5)
    track.add(np.tile(np.eye(3, dtype=np.float32)[[0] * 150 + [1] * 150], (1, 1)), 0.0, 6.0)
    output = diarize_output("x", [Turn(0.0, 6.0, "A"), Turn(3.5, 5.0, "B")], [0.9, 0.5], False, track.voices())
    assert np.isfinite(output.speaker_embeddings).all()
    assert int(np.argmax(output.speaker_embeddings[1])) == 1


def test_silence_gives_no_labels_and_an_empty_embedding_matrix():
    output = tone_diarizer().run(np.zeros(3 * SR, dtype=np.float32))
    assert output.labels == () and output.speaker_embeddings.shape == (0, len(TONES))


def test_a_model_without_speaker_embeddings_gives_none():
    diarizer = tone_diarizer()
    diarizer.voice_function = None
    assert diarizer.run(tone_audio(REFERENCE, 16.0)).speaker_embeddings is None


def test_in_memory_audio_gives_the_same_result_as_its_file(tmp_path):
    audio = tone_audio(REFERENCE, 16.0)
    path = tmp_path / "meeting.wav"
    sf.write(path, audio, SR, subtype="FLOAT")
    diarizer = tone_diarizer()
    from_file = diarizer.run(path)
    from_memory = diarizer.run({"waveform": torch.from_numpy(audio)[None], "sample_rate": SR, "uri": "meeting"})
    assert from_memory.turns == from_file.turns and from_memory.uri == from_file.uri == "meeting"
    np.testing.assert_array_equal(from_memory.speaker_embeddings, from_file.speaker_embeddings)
    assert diarizer(path) == diarizer({"waveform": audio, "sample_rate": SR, "uri": "meeting"})
    # Two channels at 32 kHz: mixed down and resampled to the same turns, within a frame.
    t = np.arange(len(audio) * 2) / (2 * SR)
    upsampled = np.interp(t, np.arange(len(audio)) / SR, audio).astype(np.float32)
    stereo = diarizer.run({"waveform": np.stack([upsampled, upsampled]), "sample_rate": 2 * SR})
    assert [t.speaker for t in stereo.turns] == [t.speaker for t in from_file.turns]
    for ours, theirs in zip(stereo.turns, from_file.turns):
        assert ours.start == pytest.approx(theirs.start, abs=0.04) and ours.end == pytest.approx(theirs.end, abs=0.04)


@pytest.mark.parametrize("audio, needle", [
    ({"waveform": np.zeros(SR)}, "sample_rate"),
    ({"waveform": np.zeros((SR, 2)), "sample_rate": SR}, "(channels, samples)"),
    ({"waveform": np.zeros(SR), "sample_rate": 0}, "sample_rate"),
    ({"waveform": np.zeros((1, 1, SR)), "sample_rate": SR}, "shape"),
])
def test_bad_in_memory_audio_is_a_one_line_error(audio, needle):
    with pytest.raises(NanodrzError, match="sample_rate|shape|channels") as raised:
        tone_diarizer().run(audio)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_progress_hook_rises_to_the_whole_length(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone_audio(REFERENCE, 20.0), SR)
    calls = []
    tone_diarizer().run(path, on_progress=lambda *call: calls.append(call))
    assert len(calls) == 4  # 6 s chunks
    assert {name for name, _, _ in calls} == {"long"} and {total for _, _, total in calls} == {20.0}
    done = [seconds for _, seconds, _ in calls]
    assert done == sorted(done) and done[0] > 0 and done[-1] == 20.0


# --- the command line ------------------------------------------------------------------------------
def test_cli_writes_every_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Diarizer, "from_pretrained", classmethod(lambda cls, *args: tone_diarizer()))
    (tmp_path / "in" / "day1").mkdir(parents=True)
    sf.write(tmp_path / "in" / "day1" / "meeting.wav", tone_audio(REFERENCE, 16.0), SR)
    out = tmp_path / "out"
    code = main(["diarize", str(tmp_path / "in"), "--out", str(out), "--format", "rttm,json,exclusive-rttm,embeddings"])
    assert code == 0, capsys.readouterr().err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["day1/meeting.embeddings.npz", "day1/meeting.exclusive.rttm", "day1/meeting.json",
                       "day1/meeting.rttm"]
    regular = read_rttm(out / "day1" / "meeting.rttm")["meeting"]
    flat = read_rttm(out / "day1" / "meeting.exclusive.rttm")["meeting"]
    assert all(a.end <= b.start + 1e-9 for a, b in zip(flat, flat[1:]))
    with np.load(out / "day1" / "meeting.embeddings.npz") as saved:  # no pickle needed to read it
        labels, embeddings = list(saved["labels"]), saved["embeddings"]
    assert labels == sorted({t.speaker for t in regular}) == sorted({t.speaker for t in flat})
    assert embeddings.shape == (len(labels), len(TONES))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (["--format", "embeddings"], "--out"),
    (["--format", "rttm,exclusive-rttm"], "--out"),
    (["--format", "rttm,csv"], "csv"),
    (["--workers", "0"], "--workers"),
])
def test_format_and_worker_arguments_are_checked_before_the_model_loads(tmp_path, capsys, extra, needle):
    audio = tmp_path / "a.wav"
    sf.write(audio, tone_audio([(0.0, 1.0, 0)], 1.0), SR)
    code = main(["diarize", str(audio), "--model", str(tmp_path / "no-model.safetensors"), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "no-model" not in lines[0]


def test_embeddings_need_a_model_that_computes_them(tmp_path, tiny_checkpoint, capsys):
    audio = tmp_path / "a.wav"
    sf.write(audio, tone_audio([(0.0, 1.0, 0)], 1.0), SR)
    code = main(["diarize", str(audio), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
                 "--format", "embeddings"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "speaker embeddings" in lines[0]


def test_two_workers_write_byte_identical_rttms_and_report_a_bad_file_once(tmp_path, tiny_checkpoint, capsys):
    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index, seconds in enumerate((7.0, 3.0, 5.0)):
        sf.write(inputs / f"f{index}.wav", (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
    (inputs / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        code = main(["diarize", str(inputs), "--model", str(tiny_checkpoint), "--out", str(out),
                     "--batch-size", "1", "--workers", str(workers), "--format", "rttm,exclusive-rttm",
                     "--nonspeech-threshold", "off"])  # the inputs are noise, which the gate would silence
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 1 and len(errors) == 1 and "broken.wav" in errors[0], errors
        runs[workers] = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(runs[1]) == sorted(f"f{i}{kind}" for i in range(3) for kind in (".rttm", ".exclusive.rttm"))
    assert runs[2] == runs[1]
    assert any(runs[1].values()), "the untrained model should write some turns"


def test_a_bad_model_stops_the_workers_with_one_line(tmp_path, capsys):
    model = tmp_path / "bad.safetensors"
    model.write_bytes(b"not a model")
    sf.write(tmp_path / "a.wav", tone_audio([(0.0, 1.0, 0)], 1.0), SR)
    code = main(["diarize", str(tmp_path / "a.wav"), "--model", str(model), "--workers", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "bad.safetensors" in lines[0], lines


def test_groups_of_a_dead_worker_are_lost_and_the_rest_waits():
    alive, dead, finished = (SimpleNamespace(pid=pid, exitcode=code) for pid, code in ((1, None), (2, -9), (3, 0)))
    assert lost_groups([alive, dead, finished], {1: 0, 2: 1, 3: 2}, {0, 1, 3}) == {1: "exit code -9"}
    assert lost_groups([dead, finished], {2: 1}, {1, 3}) == {1: "exit code -9", 3: "no worker left"}
