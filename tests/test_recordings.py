"""Fine-tuning on annotated recordings: folders written by `nanodrz simulate` (audio + RTTM) as a user's data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from nanodrz import cli
from nanodrz.annotation import Turn, read_rttm
from nanodrz.audio import load_audio
from nanodrz.config import load_config
from nanodrz.errors import NanodrzError
from nanodrz.examples import ExampleConfig, build_example, collate, example_item
from nanodrz.recordings import (RecordingAudio, RecordingSource, RecordingsConfig, conversations, load_recordings,
                                split_recordings, validation_examples)
from nanodrz.tokenizer import Tokenizer
from nanodrz.train import train, training_stream
from nanodrz.training_config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SR = 16000
EXAMPLES = ExampleConfig(chunk_seconds=(4.0, 6.0), prompt_probability=1.0, prompt_clip_seconds=(1.0, 2.0),
                         distractor_probability=1.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def recordings_folder(tiny_bank: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six conversations of train speakers written by `nanodrz simulate`: the user's annotated recordings."""
    out = tmp_path_factory.mktemp("recordings") / "calls"
    assert cli.main(["simulate", "--bank", str(tiny_bank), "--split", "train", "--preset", "overlap", "--num", "6",
                     "--seed", "3", "--set", "duration=[14,18]", "--set", "num_speakers=[2,3]", "--out", str(out)]) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def config_of(path: Path, **values) -> RecordingsConfig:
    return RecordingsConfig(path=str(path), **values)


def drawn_example(source: RecordingSource, seed: int, index: int, examples: ExampleConfig, max_seconds: float):
    """Sample `index` of the stream cut into an example as the stream would, if the recordings claim it."""
    drawn = source.draw(seed, index)
    if drawn is None:
        return None
    conversation, rng = drawn
    return build_example(conversation, examples, max_seconds, rng)


# --- the source --------------------------------------------------------------------------------------
def test_folder_and_list_file_give_the_same_recordings_split_deterministically(recordings_folder, tmp_path):
    listing = recordings_folder / "recordings.list"
    stems = sorted(p.stem for p in recordings_folder.glob("*.wav"))
    listing.write_text("# audio rttm\n" + "".join(f"{s}.wav {s}.rttm\n" for s in stems))
    try:
        from_folder = load_recordings(config_of(recordings_folder, validation_fraction=0.34), 4)
        from_list = load_recordings(config_of(listing, validation_fraction=0.34), 4)
    finally:
        listing.unlink()
    assert [r.name for r in from_folder.training + from_folder.held_out] != []
    for a, b in ((from_folder.training, from_list.training), (from_folder.held_out, from_list.held_out)):
        assert [(r.name, r.turns, r.regions) for r in a] == [(r.name, r.turns, r.regions) for r in b]
    assert len(from_folder.held_out) == 2 and len(from_folder.training) == 4
    assert {r.name for r in from_folder.training} | {r.name for r in from_folder.held_out} == set(stems)
    for recording in from_folder.training:  # RTTM times are rounded: a last turn may end past the audio
        duration = sf.info(str(recording.audio)).duration
        reference = read_rttm(recording.audio.with_suffix(".rttm"))[recording.file_id]
        assert list(recording.turns) == [Turn(t.start, min(t.end, duration), t.speaker) for t in reference]
        assert recording.regions == ((0.0, duration),)
    recordings = from_folder.training + from_folder.held_out
    again = split_recordings(recordings, 0.34, 0)
    assert [r.name for r in again[1]] == [r.name for r in from_folder.held_out]
    held_out_by_seed = {tuple(r.name for r in split_recordings(recordings, 0.34, seed)[1]) for seed in range(8)}
    assert len(held_out_by_seed) > 1, "the seed chooses the held-out recordings"
    assert split_recordings(recordings, 0.0, 0) == (recordings, [])
    assert "4 (" in from_folder.describe() and "2 (" in from_folder.describe()


def test_audio_is_read_by_slices_at_16k_mono(recordings_folder, tmp_path):
    path = sorted(recordings_folder.glob("*.wav"))[0]
    whole, _ = sf.read(str(path), dtype="float32")
    audio = RecordingAudio(path, 16000, len(whole) - 16000)
    assert len(audio) == audio.shape[0] == len(whole) - 16000
    np.testing.assert_array_equal(audio[8000:40000], whole[24000:56000])
    assert len(audio[len(audio) - 10:len(audio) + 50]) == 10
    stereo = tmp_path / "stereo.flac"
    sf.write(str(stereo), np.stack([whole, 0.5 * whole], axis=1), 44100)  # played back as if sampled at 44.1 kHz
    reference = load_audio(stereo)
    resampled = RecordingAudio(stereo, 0, len(reference))
    for first in (0, 12345, len(reference) - 20000):
        piece = resampled[first:first + 16000]
        assert len(piece) == 16000
        np.testing.assert_allclose(piece[200:-200], reference[first + 200:first + 16000 - 200], atol=2e-3)


def test_uem_stretches_become_conversations_of_their_own(recordings_folder, tmp_path):
    folder = copy_of(recordings_folder, tmp_path)
    stem = sorted(p.stem for p in folder.glob("*.wav"))[0]
    (folder / f"{stem}.uem").write_text(f"{stem} 1 1.0 6.0\n{stem} 1 8.0 12.5\n")
    data = load_recordings(config_of(folder, validation_fraction=0.0), 4)
    [recording] = [r for r in data.training if r.name == stem]
    assert recording.regions == ((1.0, 6.0), (8.0, 12.5))
    parts = conversations(recording)
    assert [len(part.audio) for part in parts] == [5 * SR, int(4.5 * SR)]
    whole, _ = sf.read(str(folder / f"{stem}.wav"), dtype="float32")
    np.testing.assert_array_equal(parts[1].audio[0:SR], whole[8 * SR:9 * SR])
    expected = [(max(t.start, 8.0) - 8.0, min(t.end, 12.5) - 8.0, t.speaker)
                for t in recording.turns if t.end > 8.0 and t.start < 12.5]
    assert [(t.start, t.end, t.speaker) for t in parts[1].turns] == expected
    shared = tmp_path / "all.uem"
    shared.write_text(f"{stem} 1 2.0 5.0\n")
    (folder / f"{stem}.uem").unlink()
    [recording] = [r for r in load_recordings(config_of(folder, uem=str(shared), validation_fraction=0.0),
                                              4).training if r.name == stem]
    assert recording.regions == ((2.0, 5.0),)


def test_examples_from_recordings_match_their_rttm_and_prompt_from_outside_the_chunk(recordings_folder):
    data = load_recordings(config_of(recordings_folder, ratio=1.0, validation_fraction=0.0), 4)
    tokenizer = Tokenizer(load_config(Config, TINY).tokenizer)
    wholes = [(recording, sf.read(str(recording.audio), dtype="float32")[0]) for recording in data.training]
    prompted = 0
    for index in range(12):
        example = drawn_example(data.source, 7, index, EXAMPLES, tokenizer.config.max_seconds)
        window, offset = example.chunk_window, example.chunk_start
        chunk_of = lambda whole: whole[int(round(window[0] * SR)):int(round(window[1] * SR))]  # noqa: E731
        [(recording, whole)] = [(r, whole) for r, whole in wholes if len(chunk_of(whole)) == len(example.audio) - int(
            round(offset * SR)) and np.array_equal(example.audio[-len(chunk_of(whole)):], chunk_of(whole))]
        expected = sorted((max(t.start, window[0]) - window[0] + offset, min(t.end, window[1]) - window[0] + offset,
                           t.speaker) for t in recording.turns if t.end > window[0] and t.start < window[1])
        got = sorted((t.start, t.end, t.speaker) for t in example.turns)
        assert [g[2] for g in got] == [e[2] for e in expected]
        np.testing.assert_allclose([g[:2] for g in got], [e[:2] for e in expected], atol=1e-9)
        for clip, (start, end) in zip(example.prompt, example.clip_sources):
            assert end <= window[0] or start >= window[1], "prompt clips come from outside the chunk"
            assert {t.speaker for t in recording.turns if t.start < end and t.end > start} == {clip.speaker}
            np.testing.assert_array_equal(example.audio[int(round(clip.start * SR)):int(round(clip.end * SR))],
                                          whole[int(round(start * SR)):int(round(end * SR))])
        encoded = example.encode(tokenizer)
        decoded = tokenizer.decode(encoded.tokens)
        resolution = tokenizer.config.time_resolution
        answer = [(t.start, t.end, encoded.letters[t.speaker]) for t in example.turns
                  if tokenizer.time_token(t.end) > tokenizer.time_token(t.start)]
        assert sorted(turn.speaker for turn in decoded) == sorted(letter for _, _, letter in answer)
        for turn in decoded:
            assert any(abs(turn.start - s) <= resolution / 2 + 1e-6 and abs(turn.end - e) <= resolution / 2 + 1e-6
                       and turn.speaker == letter for s, e, letter in answer)
        prompted += bool(example.prompt)
    assert prompted >= 6


def test_the_stream_mixes_both_sources_deterministically(tiny_bank, recordings_folder):
    config = load_config(Config, TINY, [f"data.bank={tiny_bank}", "train.batch_size=4", "train.seed=5"])
    tokenizer = Tokenizer(config.tokenizer)
    source = load_recordings(config_of(recordings_folder, ratio=0.5, validation_fraction=0.0), 4).source

    def batches(workers: int, start: int, count: int, recordings: RecordingSource | None = source) -> list[dict]:
        stream = training_stream(config, tokenizer, start_batch=start, recordings=recordings)
        iterator = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
        return [next(iterator) for _ in range(count)]

    serial, parallel, resumed = batches(0, 0, 4), batches(2, 0, 4), batches(0, 2, 2)
    for a, b in zip(serial + serial[2:], parallel + resumed):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["tokens"], b["tokens"])
    simulated_only = batches(0, 0, 4, recordings=None)
    claimed = [drawn_example(source, 5, index, config.data.examples, 12.0) for index in range(16)]
    assert 4 <= sum(example is not None for example in claimed) <= 12, "both sources are drawn from"
    for index, example in enumerate(claimed):
        batch, row = divmod(index, 4)
        tokens = serial[batch]["tokens"][row, :serial[batch]["token_lengths"][row]]
        if example is None:  # a simulated example: the same as in a run without recordings
            alone = simulated_only[batch]["tokens"][row, :simulated_only[batch]["token_lengths"][row]]
            assert torch.equal(tokens, alone)
        else:
            expected = collate([example_item(example, tokenizer, config.data.examples.eos_weight)])
            assert torch.equal(tokens, expected["tokens"][0])


def test_validation_examples_are_fixed(recordings_folder):
    data = load_recordings(config_of(recordings_folder, validation_fraction=0.34), 4)
    first = validation_examples(data.held_out, EXAMPLES, 12.0, 5, seed=1)
    second = validation_examples(data.held_out, EXAMPLES, 12.0, 5, seed=1)
    assert len(first) == 5 and all(isinstance(e.audio, np.ndarray) for e in first)
    assert all(np.array_equal(a.audio, b.audio) and a.turns == b.turns for a, b in zip(first, second))


# --- training ------------------------------------------------------------------------------------------
def test_tiny_training_run_mixes_recordings_and_validates_on_held_out_ones(tiny_bank, recordings_folder, tmp_path,
                                                                           capsys):
    run_dir = tmp_path / "run"
    config = load_config(Config, TINY, [f"data.bank={tiny_bank}", f"train.out_dir={run_dir}", "train.steps=4",
                                        "train.eval_interval=4", f"data.recordings.path={recordings_folder}",
                                        "data.recordings.ratio=0.5", "data.recordings.validation_fraction=0.34"])
    result = train(config)
    assert "recordings: 4 (" in capsys.readouterr().out
    assert "val_der_recordings" in result and "val_der_clean" in result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("val_der_recordings" in r for r in records)


# --- bad input -------------------------------------------------------------------------------------------
def break_nothing(folder: Path) -> None:
    pass


def remove_an_rttm(folder: Path) -> None:
    sorted(folder.glob("*.rttm"))[0].unlink()


def garble_an_rttm(folder: Path) -> None:
    sorted(folder.glob("*.rttm"))[0].write_text("SPEAKER x 1 zero 1.0 <NA> <NA> a <NA> <NA>\n")


def stretch_a_turn(folder: Path) -> None:
    sorted(folder.glob("*.rttm"))[0].write_text("SPEAKER x 1 10.0 500.0 <NA> <NA> a <NA> <NA>\n")


def empty_the_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def crowd_a_recording(folder: Path) -> None:
    sorted(folder.glob("*.rttm"))[0].write_text("".join(
        f"SPEAKER x 1 {i}.0 0.5 <NA> <NA> s{i} <NA> <NA>\n" for i in range(5)))


def remove_an_audio_file(folder: Path) -> None:
    sorted(folder.glob("*.wav"))[0].unlink()


def corrupt_an_audio_file(folder: Path) -> None:
    sorted(folder.glob("*.wav"))[0].write_bytes(b"RIFF not audio")


@pytest.mark.parametrize("damage, overrides, message", [
    (break_nothing, ["data.recordings.path=/nonexistent/calls"], "no such folder or list file"),
    (remove_an_rttm, [], "no RTTM reference"),
    (garble_an_rttm, [], "start/duration are not numbers"),
    (stretch_a_turn, [], "past the end of"),
    (empty_the_folder, [], "holds no audio files"),
    (crowd_a_recording, [], "5 speakers in one annotated stretch"),
    (remove_an_audio_file, [], "has no audio file of the same stem"),
    (corrupt_an_audio_file, [], "cannot read audio"),
    (break_nothing, ["data.recordings.validation_fraction=0.99"], "leaves none for training"),
    (break_nothing, ["data.recordings.ratio=1.5"], "ratio must lie in [0, 1]"),
    (break_nothing, ["data.recordings.ratoi=0.5"], "unknown key 'ratoi'"),
])
def test_bad_recordings_are_one_line_errors_before_training(tiny_bank, recordings_folder, tmp_path, capsys,
                                                            damage, overrides, message):
    folder = copy_of(recordings_folder, tmp_path)
    damage(folder)
    run_dir = tmp_path / "run"
    code = cli.main(["train", str(TINY), "--set", f"data.bank={tiny_bank}", "--set", f"train.out_dir={run_dir}",
                     "--set", f"data.recordings.path={folder}", *(a for o in overrides for a in ("--set", o))])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error and len(error.strip().splitlines()) == 1
    assert not run_dir.exists(), "training did not start"


def test_bad_list_files_are_one_line_errors(recordings_folder, tmp_path):
    listing = tmp_path / "recordings.list"
    listing.write_text("")
    with pytest.raises(NanodrzError, match="lists no recordings"):
        load_recordings(config_of(listing), 4)
    listing.write_text(f"{recordings_folder}/a.wav\n")
    with pytest.raises(NanodrzError, match=r"recordings.list:1: expected 'audio rttm \[uem\]'"):
        load_recordings(config_of(listing), 4)
    stem = sorted(p.stem for p in recordings_folder.glob("*.wav"))[0]
    listing.write_text(f"{recordings_folder}/{stem}.wav {recordings_folder}/missing.rttm\n")
    with pytest.raises(NanodrzError, match="RTTM file not found"):
        load_recordings(config_of(listing), 4)
