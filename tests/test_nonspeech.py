"""Non-speech in the simulator: never in the reference, recordings without speech, levels, determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from nanodrz import nonspeech
from nanodrz.bank import Bank
from nanodrz.errors import NanodrzError
from nanodrz.examples import ExampleConfig, ExampleItems, build_example, collate
from nanodrz.simulate import conversation_rng, simulate_conversation, speech_activity
from nanodrz.simulation_config import load_preset
from nanodrz.stream import ConversationStream, Curriculum, CurriculumStage, StreamConfig
from nanodrz.tokenizer import Tokenizer, TokenizerConfig

SR = 16000
SHORT = ["duration=[8,10]"]
NO_SPEECH = [*SHORT, "nonspeech.no_speech_probability=1"]


@pytest.fixture(scope="module")
def train_bank(tiny_bank: Path) -> Bank:
    return Bank(tiny_bank, "train")


@pytest.fixture(scope="module")
def sound_folders(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing music and effects at folders of made-up recordings (a chord, a beep and a
    file whose name marks it as spoken, which must be left out)."""
    root = tmp_path_factory.mktemp("sounds")
    time = np.arange(3 * SR) / SR
    (root / "music").mkdir()
    (root / "effects").mkdir()
    chord = sum(np.sin(2 * np.pi * f * time) for f in (220.0, 277.0, 330.0)) / 6
    sf.write(root / "music" / "chord.wav", chord, SR)
    sf.write(root / "effects" / "beep.wav", 0.3 * np.sin(2 * np.pi * 880.0 * time[: SR // 5]), SR)
    sf.write(root / "effects" / "audio-channel-left.wav", np.full(SR, 0.9), SR)
    return [f"nonspeech.music_dirs=[{root / 'music'}]", f"nonspeech.effect_dirs=[{root / 'effects'}]"]


def test_non_speech_changes_the_audio_and_never_the_reference(train_bank: Bank, sound_folders: list[str]) -> None:
    quiet = load_preset("clean", SHORT)
    busy = load_preset("clean", [*SHORT, *sound_folders, "nonspeech.probability=1", "nonspeech.sounds=[3,6]"])
    placements = set()
    for index in range(6):
        plain = simulate_conversation(train_bank, quiet, conversation_rng(0, index))
        mixed = simulate_conversation(train_bank, busy, conversation_rng(0, index))
        assert mixed.turns == plain.turns and mixed.turns
        assert not np.array_equal(mixed.audio, plain.audio)
        speech, _ = speech_activity(mixed.turns)
        for sound in mixed.meta["nonspeech"]:
            placements.add(sound["placement"])
            if sound["placement"] == "between turns":
                assert all(sound["end"] <= start + 1e-3 or sound["start"] >= end - 1e-3 for start, end in speech), sound
    assert {"between turns", "under everything"} <= placements


def test_a_recording_without_speech_has_an_empty_reference_and_answer(train_bank: Bank, tiny_bank: Path) -> None:
    config = load_preset("overlap", NO_SPEECH)
    conversation = simulate_conversation(train_bank, config, conversation_rng(0, 0))
    assert conversation.turns == [] and conversation.meta["num_speakers"] == 0
    assert conversation.meta["speech_seconds"] == 0 and conversation.meta["nonspeech"]
    assert np.max(np.abs(conversation.audio)) > 1e-4
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=12, num_speakers=4))
    example = build_example(conversation, ExampleConfig(chunk_seconds=(4.0, 6.0)), 12.0, np.random.default_rng(0))
    assert example.encode(tokenizer).tokens == [Tokenizer.START, Tokenizer.PROMPT_END, Tokenizer.EOS]
    # The training stream makes and collates such examples too.
    stage = CurriculumStage(presets={"clean": 1.0}, overrides=["nonspeech.no_speech_probability=1"])
    schedule = StreamConfig(Curriculum([stage]), conversation_seconds=(8.0, 10.0)).schedule(tokenizer.num_speakers)
    stream = ConversationStream(tiny_bank, "train", schedule, seed=0, batch_size=2,
                                transform=ExampleItems(ExampleConfig(chunk_seconds=(4.0, 6.0)), tokenizer),
                                collate=collate)
    batch = next(iter(stream))
    assert batch["tokens"].tolist() == [[Tokenizer.START, Tokenizer.PROMPT_END, Tokenizer.EOS]] * 2
    assert batch["audio"].abs().amax(dim=1).min() > 1e-4


def test_same_seed_same_audio(train_bank: Bank, sound_folders: list[str]) -> None:
    config = load_preset("ambient", [*SHORT, *sound_folders, "reverb.probability=0", "nonspeech.probability=1"])
    first = [simulate_conversation(train_bank, config, conversation_rng(5, i)) for i in range(4)]
    again = [simulate_conversation(train_bank, config, conversation_rng(5, i)) for i in range(4)]
    other = simulate_conversation(train_bank, config, conversation_rng(6, 0))
    for a, b in zip(first, again):
        assert a.audio.tobytes() == b.audio.tobytes() and a.meta == b.meta and a.turns == b.turns
    assert other.audio.tobytes() != first[0].audio.tobytes()


@pytest.mark.parametrize("kind", nonspeech.KINDS)
def test_levels_lie_in_the_configured_range(train_bank: Bank, sound_folders: list[str], kind: str) -> None:
    config = load_preset("clean", [*NO_SPEECH, *sound_folders, "nonspeech.sounds=1", "nonspeech.gap_probability=0",
                                   f"nonspeech.types={{{kind}: 1}}", "nonspeech.level_db=[-12,-6]",
                                   "nonspeech.babble_level_db=[-12,-6]"])
    for index in range(2):
        conversation = simulate_conversation(train_bank, config, conversation_rng(1, index))
        (sound,) = conversation.meta["nonspeech"]
        assert sound["type"] == kind and conversation.meta["peak_gain_db"] == 0
        level = conversation.meta["level_dbfs"]
        assert level - 12 - 0.01 <= sound["level_dbfs"] <= level - 6 + 0.01
        start, end = (int(round(sound[key] * SR)) for key in ("start", "end"))
        assert nonspeech.active_level_db(conversation.audio[start:end]) == pytest.approx(sound["level_dbfs"], abs=0.3)
        assert not conversation.audio[:max(start - 16, 0)].any() and not conversation.audio[end + 16:].any()


def test_spoken_effects_are_left_out(sound_folders: list[str]) -> None:
    config = load_preset("clean", sound_folders).nonspeech
    (beep,) = nonspeech.recorded_clips("effects", config)
    assert beep.size == SR // 5


@pytest.mark.parametrize("override, needle", [
    ("nonspeech.types={speech: 1}", "unknown entry 'speech'"),
    ("nonspeech.level_db=[0,-10]", "minimum is above maximum"),
    ("nonspeech.no_speech_probability=1.5", "a probability must lie in [0, 1]"),
    ("nonspeech.burst_seconds=[0,1]", "at least 0.05"),
    ("nonspeech.loudness=3", "loudness"),
])
def test_bad_knobs_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(NanodrzError) as error:
        load_preset("clean", [override])
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_only_missing_recordings_is_an_error(train_bank: Bank, tmp_path: Path) -> None:
    config = load_preset("clean", [*NO_SPEECH, "nonspeech.types={music: 1}", f"nonspeech.music_dirs=[{tmp_path}]"])
    with pytest.raises(NanodrzError, match="no recorded sounds|none in"):
        simulate_conversation(train_bank, config, conversation_rng(0, 0))
