"""Long-form inference: chunking, speaker prompts, stitching, enrollment, outputs, and bad input.

The long-form mechanics are tested with a crafted decoder whose "voices" are pure tones: it reads
each 20 ms frame's tone, letters tones in the prompt by their clip, and letters new tones after them,
exactly as the trained model is asked to. Label consistency across chunks then depends only on the
prompting and stitching logic under test.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from nanodrz.annotation import Turn, from_annotation, read_rttm
from nanodrz.cli import main
from nanodrz.decoding import DecodingResult
from nanodrz.longform import iter_chunks
from nanodrz.outputs import exclusive
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.pipeline import Diarizer
from nanodrz.postprocess.stitch import stitch
from nanodrz.tokenizer import Tokenizer, TokenizerConfig, letter

SR = 16000
TONES = (220.0, 330.0, 495.0, 740.0, 1110.0)
FRAME = 320


def tone_audio(turns: list[tuple[float, float, int]], seconds: float) -> np.ndarray:
    audio = np.zeros(int(seconds * SR), dtype=np.float32)
    for start, end, voice in turns:
        t = np.arange(int(start * SR), int(end * SR)) / SR
        audio[int(start * SR):int(start * SR) + len(t)] += 0.3 * np.sin(2 * np.pi * TONES[voice] * t)
    return audio


def frame_voices(audio: np.ndarray) -> list[int | None]:
    voices = []
    freqs = np.fft.rfftfreq(FRAME, 1 / SR)
    for start in range(0, len(audio) - FRAME + 1, FRAME):
        frame = audio[start:start + FRAME]
        if np.sqrt(np.mean(frame ** 2)) < 0.02:
            voices.append(None)
            continue
        peak = freqs[np.argmax(np.abs(np.fft.rfft(frame * np.hanning(FRAME))))]
        voices.append(int(np.argmin([abs(peak - f) for f in TONES])))
    return voices


def tone_decode(model, audio, prompts, options) -> list[DecodingResult]:
    """A decoder for tone voices that follows the model's contract (prompt letters, then new letters)."""
    results = []
    for signal, prompt in zip(audio, prompts):
        voices = frame_voices(signal)
        letter_of: dict[int, str] = {}
        for turn in prompt:
            frames = voices[int(turn.start * 50) + 1:int(turn.end * 50) - 1]
            voice = max(set(v for v in frames if v is not None), key=frames.count)
            letter_of[voice] = turn.speaker
        answer_from = int(round(max((t.end for t in prompt), default=0.0) * 50))
        turns, index = [], answer_from
        while index < len(voices):
            voice = voices[index]
            if voice is None:
                index += 1
                continue
            end = index
            while end < len(voices) and voices[end] == voice:
                end += 1
            if voice not in letter_of:
                letter_of[voice] = letter(len(letter_of))
            turns.append(Turn(index / 50, end / 50, letter_of[voice]))
            index = end
        results.append(DecodingResult(turns, [1.0] * len(turns), [], {}))
    return results


def tone_voices(audio: np.ndarray) -> np.ndarray:
    """The voice of each 20 ms frame, as the model's front end gives one: here one-hot per tone."""
    voices = frame_voices(audio)
    embeddings = np.zeros((len(voices), len(TONES)), dtype=np.float32)
    for index, voice in enumerate(voices):
        if voice is not None:
            embeddings[index, voice] = 1.0
    return embeddings


def tone_counts(audio: np.ndarray) -> np.ndarray:
    """segmentation-3.0's counts (none, one, two) per 20 ms frame, as a tone hearer gives them: one voice
    wherever a tone sounds."""
    heard = np.array([voice is not None for voice in frame_voices(audio)], dtype=np.float32)
    return np.stack([1.0 - heard, heard, np.zeros_like(heard)], axis=1)


class ToneModel:
    def __init__(self, max_seconds=12.0):
        self.tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.02, max_seconds=max_seconds, num_speakers=8))
        self.config = SimpleNamespace(frame_rate=50.0)

    def eval(self):
        return self


# Every rule that re-decides labels by voice, off: the labels the decoder wrote, stitched.
NO_VOICE_RULES = {"merge.threshold": None, "refine.passes": 0, "split.two_voice_cosine": None,
                  "split.same_voice_cosine": None, "absorb.min_label_seconds": 0.0}


def changed(changes: dict) -> PipelineParams:
    """The default parameters with dotted `changes`."""
    return PipelineParams().with_values(changes)


def tone_diarizer(chunk=6.0, max_seconds=12.0, clips=(1.0, 2.0), max_prompt_speakers=4) -> Diarizer:
    config = {"data": {"examples": {"chunk_seconds": [3.0, chunk], "prompt_clip_seconds": list(clips),
                                    "max_prompt_speakers": max_prompt_speakers}}}
    return Diarizer(ToneModel(max_seconds), config, decode_fn=tone_decode, voice_function=tone_voices,
                    count_function=tone_counts)


def labels_by_voice(turns: list[Turn], reference: list[tuple[float, float, int]]) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for turn in turns:
        middle = (turn.start + turn.end) / 2
        for start, end, voice in reference:
            if start <= middle <= end:
                seen.setdefault(voice, set()).add(turn.speaker)
    return seen


def test_long_form_labels_stay_consistent_across_chunks():
    reference = [(0.5, 2.5, 0), (3.0, 5.0, 1), (6.5, 8.0, 0), (8.5, 10.0, 1), (13.0, 15.0, 2),
                 (15.5, 17.0, 0), (19.0, 20.5, 1), (21.0, 23.0, 2), (26.0, 28.0, 0)]
    audio = tone_audio(reference, 30.0)
    turns = from_annotation(tone_diarizer()(audio))
    seen = labels_by_voice(turns, reference)
    assert all(len(labels) == 1 for labels in seen.values()), seen
    assert [seen[v].pop() for v in (0, 1, 2)] == ["A", "B", "C"]


def test_turn_crossing_a_chunk_boundary_is_stitched():
    reference = [(4.0, 8.5, 0), (9.0, 11.0, 1)]
    turns = from_annotation(tone_diarizer(chunk=6.0)(tone_audio(reference, 12.0)))
    a_turns = [t for t in turns if t.speaker == "A"]
    assert len(a_turns) == 1
    assert a_turns[0].start == pytest.approx(4.0, abs=0.05) and a_turns[0].end == pytest.approx(8.5, abs=0.05)


def test_more_speakers_than_prompt_slots_prompts_the_most_recent_and_merging_restores_labels():
    # Room for 2 clips only: voices 0 and 1 speak, then 2 and 3 take over; 0 comes back last.
    reference = [(0.5, 2.0, 0), (2.5, 4.5, 1), (6.5, 8.5, 2), (9.0, 11.0, 3), (12.5, 14.5, 2),
                 (15.0, 17.0, 3), (19.0, 21.0, 0)]
    diarizer = tone_diarizer(chunk=6.0, max_seconds=12.0, clips=(1.0, 2.0), max_prompt_speakers=2)
    audio = tone_audio(reference, 24.0)
    seen = labels_by_voice(from_annotation(diarizer(audio, params=changed(NO_VOICE_RULES))), reference)
    # Recently active voices keep their labels across chunks ...
    assert seen[2] == {"C"} and seen[3] == {"D"}
    # ... and a voice pushed out of the prompt comes back under a new label ...
    assert seen[0] == {"A", "E"}
    # ... which merging and re-labelling by voice (the default) give back its first label.
    seen = labels_by_voice(from_annotation(diarizer(audio)), reference)
    assert seen == {0: {"A"}, 1: {"B"}, 2: {"C"}, 3: {"D"}}


def test_max_speakers_holds_over_the_whole_recording():
    # Four voices, one per 5 s chunk, each new to the model: at most 2 labels asked for.
    reference = [(0.5, 3.5, 0), (5.5, 8.5, 1), (10.5, 13.5, 2), (15.5, 18.5, 3)]
    turns = from_annotation(tone_diarizer(chunk=5.0)(tone_audio(reference, 20.0),
                                                     DiarizationSettings(max_speakers=2)))
    assert sorted({t.speaker for t in turns}) == ["A", "B"]


def sloppy_tone_decode(model, audio, prompts, options) -> list[DecodingResult]:
    """`tone_decode` that misses every change of voice without a pause: touching turns become one,
    under the first turn's letter (the embeddings stay true)."""
    results = tone_decode(model, audio, prompts, options)
    for result in results:
        joined: list[Turn] = []
        for turn in result.turns:
            if joined and abs(joined[-1].end - turn.start) < 1e-9:
                joined[-1] = Turn(joined[-1].start, turn.end, joined[-1].speaker)
            else:
                joined.append(turn)
        result.turns, result.scores = joined, [1.0] * len(joined)
    return results


def test_voice_refinement_splits_a_turn_that_runs_over_a_change_of_voice():
    reference = [(0.5, 2.5, 0), (2.5, 4.5, 1), (5.0, 7.0, 1)]
    diarizer = tone_diarizer(chunk=6.0)
    diarizer.decode_fn = sloppy_tone_decode
    audio = tone_audio(reference, 8.0)
    unrefined = from_annotation(diarizer(audio, params=changed({"refine.passes": 0})))
    assert [(t.speaker, t.start, t.end) for t in unrefined] == [("A", 0.5, 4.5), ("B", 5.0, 7.0)]
    refined = from_annotation(diarizer(audio))
    assert [t.speaker for t in refined] == ["A", "B", "B"]
    assert refined[0].start == pytest.approx(0.5) and refined[0].end == pytest.approx(2.5, abs=0.03)
    assert refined[1].start == pytest.approx(2.5, abs=0.03) and refined[1].end == pytest.approx(4.5)
    assert (refined[2].start, refined[2].end) == (pytest.approx(5.0), pytest.approx(7.0))


def counting_tone_decode(model, audio, prompts, options) -> list[DecodingResult]:
    """`tone_decode`, which writes one voice per frame, plus an overlap head that counts the tones of
    each 20 ms frame (frame rate 50)."""
    results = tone_decode(model, audio, prompts, options)
    freqs = np.fft.rfftfreq(FRAME, 1 / SR)
    for signal, result in zip(audio, results):
        counts = []
        for start in range(0, len(signal) - FRAME + 1, FRAME):
            spectrum = np.abs(np.fft.rfft(signal[start:start + FRAME] * np.hanning(FRAME)))
            tones = sum(spectrum[np.argmin(np.abs(freqs - f))] > 5.0 for f in TONES)
            counts.append(np.eye(3, dtype=np.float32)[min(tones, 2)])
        result.speaker_counts = np.asarray(counts).reshape(-1, 3)
    return results


def test_overlap_the_decoder_missed_is_added_from_the_overlap_head():
    # The second voice is quieter: in the overlap the decoder writes only the first.
    audio = tone_audio([(0.5, 3.0, 0), (5.5, 7.5, 0)], 8.0) + 0.5 * tone_audio([(2.5, 5.0, 1)], 8.0)
    diarizer = tone_diarizer(chunk=6.0)
    diarizer.decode_fn = counting_tone_decode
    written = from_annotation(diarizer(audio, params=changed({"resegment.overlap_threshold": None})))
    assert not any(a.end > b.start for a, b in zip(written, written[1:]))
    turns = from_annotation(diarizer(audio))
    by_speaker = {label: [(t.start, t.end) for t in turns if t.speaker == label] for label in "AB"}
    assert by_speaker["A"][0] == (pytest.approx(0.5, abs=0.03), pytest.approx(3.0, abs=0.03))
    assert by_speaker["B"][0] == (pytest.approx(2.5, abs=0.03), pytest.approx(5.0, abs=0.03))


def test_one_label_over_two_close_voices_is_split_when_the_overlap_head_hears_both():
    # The decoder writes one letter for two voices whose embeddings have a cosine of 0.85, too close for
    # re-labelling to split; 1.2 s of confident overlap proves there are two. Written as two letters, the
    # same voices are left alone: neither label holds almost all the speech.
    def one_letter_decode(model, audio, prompts, options):
        results = counting_tone_decode(model, audio, prompts, options)
        for result in results:
            result.turns = [Turn(t.start, t.end, "A") for t in result.turns]
        return results

    mixing = np.zeros((len(TONES), 2), dtype=np.float32)
    mixing[0], mixing[1] = [1.0, 0.0], [0.85, np.sqrt(1 - 0.85 ** 2)]
    diarizer = tone_diarizer(chunk=6.0)
    diarizer.decode_fn = one_letter_decode
    diarizer.voice_function = lambda audio: tone_voices(audio) @ mixing
    audio = tone_audio([(0.5, 4.0, 0), (2.8, 7.5, 1)], 8.0)
    assert {t.speaker for t in from_annotation(diarizer(audio, params=changed({"resegment.overlap_threshold": None})))} == {"A"}
    assert {t.speaker for t in from_annotation(diarizer(audio, DiarizationSettings(max_speakers=1)))} == {"A"}
    turns = from_annotation(diarizer(audio))
    assert {t.speaker for t in turns} == {"A", "B"}
    assert min(t.start for t in turns if t.speaker == "B") == pytest.approx(2.8, abs=0.1)
    diarizer.decode_fn = counting_tone_decode
    assert {t.speaker for t in from_annotation(diarizer(audio))} == {"A", "B"}


def test_turns_shorter_than_two_time_bins_are_dropped_with_their_labels():
    # A 20 ms blip of a second voice (one 20 ms time bin) is not a speaker.
    turns = from_annotation(tone_diarizer()(tone_audio([(0.5, 2.5, 0), (3.0, 3.02, 1), (4.0, 5.8, 2)], 6.0)))
    assert [(t.speaker, round(t.start, 2)) for t in turns] == [("A", 0.5), ("B", 4.0)]


def test_chunk_outputs_replay_the_post_processing_under_any_settings():
    reference = [(0.5, 2.5, 0), (3.0, 5.0, 1), (6.5, 8.0, 0), (8.5, 10.0, 1), (13.0, 15.0, 2)]
    recordings = [("tones", tone_audio(reference, 16.0)), ("silent", np.zeros(SR, dtype=np.float32))]
    diarizer = tone_diarizer()
    replayed = dict(diarizer.chunk_outputs_many(recordings))
    for settings, params in ((DiarizationSettings(), PipelineParams()),
                             (DiarizationSettings(exclusive=True), changed({"merge.threshold": -1.0, "refine.passes": 0}))):
        [(_, direct), (_, silent)] = list(diarizer.diarize_many(recordings, settings, params=params))
        turns, scores = replayed["tones"].finish(params, settings)
        assert (exclusive(turns, scores) if settings.exclusive else turns) == direct
        assert replayed["silent"].finish(params, settings) == ([], [])
        assert silent == []


def test_enrollment_names_speakers_and_unknown_voices_keep_letters():
    reference = [(0.5, 2.5, 1), (3.0, 5.0, 0), (5.5, 7.0, 1)]
    enrollment = tone_audio([(0.0, 2.0, 0)], 2.0)
    turns = from_annotation(tone_diarizer()(tone_audio(reference, 8.0), enroll={"alice": enrollment}))
    seen = labels_by_voice(turns, reference)
    assert seen[0] == {"alice"} and seen[1] == {"A"}


def test_stitch_and_exclusive():
    turns, scores = stitch([Turn(0, 6.0, "A"), Turn(6.01, 8, "A"), Turn(7, 9, "B")], [0.9, 0.8, 0.6], 0.04)
    assert turns == [Turn(0, 8, "A"), Turn(7, 9, "B")]
    flat = exclusive(turns, scores)
    assert flat == [Turn(0, 8, "A"), Turn(8, 9, "B")]
    for a, b in zip(flat, flat[1:]):
        assert a.end <= b.start


def test_streamed_chunks_match_whole_file_load(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.standard_normal((44100 * 5, 2)).astype(np.float32) * 0.1
    path = tmp_path / "x.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    chunks = list(iter_chunks(path, 2.0))
    assert [len(c) for c in chunks] == [32000, 32000, 16000]
    from nanodrz.audio import load_audio

    whole = load_audio(path)
    streamed = np.concatenate(chunks)
    assert len(streamed) == len(whole)
    assert np.abs(streamed[1000:-1000] - whole[1000:-1000]).max() < 1e-3


def test_settings_validation():
    from nanodrz.errors import NanodrzError

    with pytest.raises(NanodrzError):
        DiarizationSettings(min_speakers=3, max_speakers=2)
    assert DiarizationSettings(num_speakers=2).max_speakers == 2
    with pytest.raises(NanodrzError, match="resegment.overlap_threshold"):
        changed({"resegment.overlap_threshold": 1.5})


# --- the command line with a real (tiny, untrained) checkpoint ------------------------------------
def write(path, audio, rate=16000, subtype="PCM_16"):
    sf.write(path, audio, rate, subtype=subtype)
    return path


def test_cli_processes_good_files_and_reports_each_bad_one(tmp_path, tiny_checkpoint, capsys):
    rng = np.random.default_rng(1)
    good = write(tmp_path / "good.wav", (rng.standard_normal(16000 * 14) * 0.1).astype(np.float32))
    write(tmp_path / "good48k.flac", (rng.standard_normal((48000 * 3, 2)) * 0.1).astype(np.float32), 48000)
    short = write(tmp_path / "short.wav", np.zeros(4000, dtype=np.float32) + 0.1)
    silent = write(tmp_path / "silent.wav", np.zeros(16000 * 2, dtype=np.float32))
    nan = np.full(16000, 0.1, dtype=np.float32)
    nan[100] = np.nan
    nan_file = write(tmp_path / "nan.wav", nan, subtype="FLOAT")
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    (tmp_path / "empty.wav").write_bytes(b"")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    out = tmp_path / "out"
    code = main(["diarize", str(good), str(tmp_path / "good48k.flac"), str(short), str(silent), str(nan_file),
                 str(tmp_path / "broken.wav"), str(tmp_path / "empty.wav"), str(empty_dir),
                 "--model", str(tiny_checkpoint), "--out", str(out), "--format", "rttm,json", "--plot"])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 5, errors
    for needle in ("short.wav", "NaN", "broken.wav", "empty", "no audio files"):
        assert any(needle in line for line in errors), needle
    assert read_rttm(out / "silent.rttm") == {}, "digital silence: nobody speaks"
    for name in ("good", "good48k"):
        assert (out / f"{name}.rttm").exists() and (out / f"{name}.png").exists()
        data = json.loads((out / f"{name}.json").read_text())
        assert data["uri"] == name
        turns = read_rttm(out / f"{name}.rttm").get(name, [])
        assert [(t.start, t.end, t.speaker) for t in turns] == [
            (pytest.approx(t["start"], abs=1e-3), pytest.approx(t["end"], abs=1e-3), t["speaker"])
            for t in data["turns"]]


@pytest.mark.parametrize("content", [b"not a model", b""])
def test_cli_rejects_a_corrupt_model(tmp_path, content, capsys):
    model = tmp_path / "bad.safetensors"
    model.write_bytes(content)
    audio = write(tmp_path / "a.wav", np.full(16000, 0.1, dtype=np.float32))
    assert main(["diarize", str(audio), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]


def test_cli_rejects_an_incompatible_model(tmp_path, tiny_checkpoint, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        metadata = dict(handle.metadata())
        weights = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata["version"] = "999"
    other = tmp_path / "other.safetensors"
    save_file(weights, str(other), metadata=metadata)
    audio = write(tmp_path / "a.wav", np.full(16000, 0.1, dtype=np.float32))
    assert main(["diarize", str(audio), "--model", str(other)]) == 2
    assert "another nanodrz version" in capsys.readouterr().err


def test_python_api_returns_an_annotation(tiny_checkpoint):
    diarizer = Diarizer.from_pretrained(tiny_checkpoint)
    audio = (np.random.default_rng(2).standard_normal(16000 * 3) * 0.1).astype(np.float32)
    annotation = diarizer(audio, uri="meeting")
    assert annotation.uri == "meeting"


def test_shipped_model_diarizes_the_example_conversation():
    from pathlib import Path

    from nanodrz.pipeline import SHIPPED_MODEL
    from nanodrz.evaluate import score

    assert SHIPPED_MODEL.is_file(), "the package must ship a default model"
    root = Path(__file__).resolve().parents[1] / "examples"
    turns = from_annotation(Diarizer.from_pretrained()(root / "conversation.wav"))
    assert len({t.speaker for t in turns}) >= 2
    report = score(read_rttm(root / "conversation.rttm"), {"conversation": turns})
    assert report.der(0.0) < 0.2  # 8.3% at collar 0 with the shipped model and parameters (bash scripts/run-example.sh)


def test_encode_once_runs_each_frozen_encoder_once_per_chunk_and_still_diarizes():
    from pathlib import Path

    from nanodrz.encode_once import StretchEncoder
    from nanodrz.evaluate import score

    diarizer = Diarizer.from_pretrained()
    encoder = diarizer.stretch_encoder(changed({"long_form.encode_once": True}))
    rng = np.random.default_rng(0)
    before, chunk, after = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (32000, 48000, 4000))
    encoded = encoder.encode_chunk(before, chunk, after)
    assert encoded.features.trunk.shape == (48000 // 320, 512) and encoded.context_seconds == 0.76
    clip = encoder.cut(encoded.features, 640, 6400)
    assembled = encoder.assemble([clip, clip], encoded.features)
    assert assembled.trunk.shape[0] == 2 * (20 + 10) + 150  # clip, 200 ms gap, clip, gap, chunk at 50 frames/s
    assert encoder.on_grid(700) == 640 and encoder.on_grid(700, up=True) == 1280
    root = Path(__file__).resolve().parents[1] / "examples"
    turns = from_annotation(diarizer(root / "conversation.wav", params=changed({"long_form.encode_once": True})))
    assert score(read_rttm(root / "conversation.rttm"), {"conversation": turns}).der(0.0) < 0.3
    assert isinstance(encoder, StretchEncoder) and tone_diarizer().stretch_encoder(PipelineParams()) is None


def test_each_chunk_runs_the_frozen_encoders_once_for_the_model_the_voice_track_and_the_gate(monkeypatch):
    from pathlib import Path

    from nanodrz.audio import load_audio

    diarizer = Diarizer.from_pretrained()
    front_end = diarizer.model.front_end
    calls = {"encode": 0, "segment": 0}
    for name in calls:
        method = getattr(front_end, name)

        def counted(*args, name=name, method=method):
            calls[name] += 1
            return method(*args)

        monkeypatch.setattr(front_end, name, counted)
    audio = load_audio(Path(__file__).resolve().parents[1] / "examples" / "conversation.wav")
    diarizer(audio)
    chunks = -(-len(audio) // int(diarizer.geometry.chunk_seconds * SR))
    assert calls == {"encode": chunks, "segment": chunks}


def test_segmentation_gate_cuts_written_speech_where_segmentation_hears_none():
    from nanodrz.postprocess import ChunkOutputs
    from nanodrz.postprocess.resegment import FrameCounts

    probabilities = np.tile(np.array([0.0, 1.0, 0.0], dtype=np.float32), (100, 1))
    probabilities[25:50] = [0.9, 0.1, 0.0]  # 1-2 s: segmentation-3.0 hears nobody
    outputs = ChunkOutputs((Turn(0.0, 4.0, "A"),), (1.0,), None, None, FrameCounts(probabilities, 25.0), frozenset(),
                           0.04, loudest_dbfs=-10.0)
    for threshold, expected in ((0.8, [(0.0, 1.0), (2.0, 4.0)]), (0.95, [(0.0, 4.0)]), (None, [(0.0, 4.0)])):
        turns, _ = outputs.finish(changed({"resegment.nonspeech_threshold": threshold}), DiarizationSettings())
        assert [(t.start, t.end) for t in turns] == [pytest.approx(e, abs=0.03) for e in expected], threshold
