"""The conversation simulator: turn-taking statistics, levels, references, determinism, sharding, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodrz import acoustics, cli
from nanodrz.annotation import read_rttm
from nanodrz.bank import Bank
from nanodrz.errors import ConfigError, NanodrzError
from nanodrz.simulate import conversation_rng, fixed_conversations, simulate_conversation, speech_activity
from nanodrz.simulation_config import SimulationConfig, TurnTakingConfig, load_preset, preset_names
from nanodrz.stream import ConversationStream, Curriculum, CurriculumStage

SR = 16000
SHORT = ["duration=[8,10]"]


@pytest.fixture(scope="module")
def train_bank(tiny_bank: Path) -> Bank:
    return Bank(tiny_bank, "train")


def simulate_many(bank: Bank, config: SimulationConfig, count: int, seed: int = 0, **kwargs) -> list:
    return [simulate_conversation(bank, config, conversation_rng(seed, i), **kwargs) for i in range(count)]


def samples(turn) -> slice:
    return slice(int(round(turn.start * SR)), int(round(turn.end * SR)))


def test_every_preset_is_documented_and_simulates(train_bank: Bank) -> None:
    assert {"clean", "overlap", "noisy", "crowd", "phone", "long"} <= set(preset_names())
    for name in preset_names():
        text = (Path(acoustics.__file__).parent / "presets" / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}:"), f"preset {name} lacks its comment header"
        config = load_preset(name, ["duration=[6,8]", "reverb.rooms=4"])
        conversation = simulate_conversation(train_bank, config, np.random.default_rng(1))
        assert conversation.audio.dtype == np.float32 and conversation.sample_rate == SR
        assert np.max(np.abs(conversation.audio)) <= 0.99 + 1e-6
        assert conversation.turns and conversation.meta["speech_ratio"] > 0.2


def test_benchmark_presets_load_and_simulate(train_bank: Bank) -> None:
    """The preset files the benchmarks name (`--preset benchmarks/presets/NAME.yaml`) stay valid."""
    files = sorted((Path(__file__).parents[1] / "benchmarks" / "presets").glob("*.yaml"))
    assert {path.stem for path in files} >= {"meeting10", "rapid"}
    for path in files:
        assert path.read_text().startswith(f"# {path.stem}:"), f"{path} lacks its comment header"
        config = load_preset(str(path), ["duration=[6,8]", "reverb.rooms=4"])
        conversation = simulate_conversation(train_bank, config, np.random.default_rng(1))
        assert conversation.turns and conversation.meta["speech_ratio"] > 0.2


def test_overlap_knobs_change_measured_overlap(train_bank: Bank) -> None:
    def mean_overlap(preset: str, overrides: list[str]) -> float:
        conversations = simulate_many(train_bank, load_preset(preset, SHORT + overrides), 12)
        return float(np.mean([c.meta["overlap_ratio"] for c in conversations]))

    none = mean_overlap("overlap", ["turns.interruption_probability=0", "turns.backchannels_per_minute=0"])
    clean = mean_overlap("clean", [])
    lively = mean_overlap("overlap", [])
    assert none == 0.0
    assert lively > clean + 0.1
    targeted = mean_overlap("clean", ["turns.target_overlap_ratio=0.25"])
    assert abs(targeted - 0.25) < 0.05


def test_measured_overlap_agrees_with_the_turns(train_bank: Bank) -> None:
    conversation = simulate_conversation(train_bank, load_preset("overlap", SHORT), np.random.default_rng(3))
    frames = np.zeros(conversation.audio.size // 160 + 1, dtype=int)
    for turn in conversation.turns:
        frames[int(round(turn.start * 100)):int(round(turn.end * 100))] += 1
    assert conversation.meta["overlap_ratio"] == pytest.approx(np.sum(frames > 1) / np.sum(frames > 0), abs=0.02)
    union, overlap = speech_activity(conversation.turns)
    assert conversation.meta["speech_seconds"] == pytest.approx(sum(e - s for s, e in union), abs=1e-3)


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_noise_is_added_at_the_requested_snr(train_bank: Bank, kind: str) -> None:
    config = load_preset("clean", SHORT + ["noise.probability=1", f"noise.types={{{kind}: 1}}", "noise.snr_db=[10,10]"])
    for conversation in simulate_many(train_bank, config, 3, return_sources=True):
        (noise_meta,) = conversation.meta["noise"]
        assert noise_meta["type"] == kind and noise_meta["snr_db"] == 10.0
        assert abs(noise_meta["measured_snr_db"] - 10.0) < 1.0
        clean = sum(conversation.sources.values())
        noise = conversation.audio - clean
        speech = np.zeros(clean.size, dtype=bool)
        for turn in conversation.turns:
            speech[samples(turn)] = True
        snr = 10 * np.log10(np.mean(clean[speech] ** 2) / np.mean(noise[speech] ** 2))
        assert abs(snr - 10.0) < 1.0


def test_babble_and_music_noises(train_bank: Bank) -> None:
    for kind in ("babble", "music"):
        if kind == "music" and not acoustics.available_music(("/usr/share/asterisk/moh",)):
            continue
        noise = ["noise.probability=1", f"noise.types={{{kind}: 1}}", "noise.snr_db=[5,5]"]
        config = load_preset("clean", SHORT + noise)
        (conversation,) = simulate_many(train_bank, config, 1)
        assert conversation.meta["noise"][0]["type"] == kind
        assert abs(conversation.meta["noise"][0]["measured_snr_db"] - 5.0) < 4.0


def test_missing_music_falls_back_or_fails_clearly(train_bank: Bank, tmp_path: Path) -> None:
    empty = f"noise.music_dirs=['{tmp_path}']"
    config = load_preset("clean", SHORT + ["noise.probability=1", "noise.types={music: 1, white: 1}", empty])
    with pytest.warns(UserWarning, match="no music files"):
        conversations = simulate_many(train_bank, config, 4)
    assert {c.meta["noise"][0]["type"] for c in conversations} == {"white"}
    only_music = load_preset("clean", SHORT + ["noise.probability=1", "noise.types={music: 1}", empty])
    with pytest.warns(UserWarning), pytest.raises(NanodrzError, match="no music files"):
        simulate_many(train_bank, only_music, 1)


def test_speaker_count_is_honoured(tiny_bank: Path, train_bank: Bank) -> None:
    fixed = load_preset("clean", ["num_speakers=3", "duration=[6,8]"])
    for conversation in simulate_many(train_bank, fixed, 10):
        assert conversation.meta["num_speakers"] == 3
        assert len({t.speaker for t in conversation.turns}) == 3
    ranged = load_preset("crowd", ["num_speakers=[3,6]", "duration=[8,10]", "reverb.probability=0",
                                   "noise.probability=0"])
    counts = {len({t.speaker for t in c.turns}) for c in simulate_many(train_bank, ranged, 16)}
    assert counts <= {3, 4, 5, 6} and len(counts) >= 3
    test_bank = Bank(tiny_bank, "test")
    conversation = simulate_conversation(test_bank, fixed, np.random.default_rng(0))
    assert {t.speaker for t in conversation.turns} == {s.speaker for s in test_bank.speakers}


def test_reference_turns_match_the_mixture(train_bank: Bank) -> None:
    config = load_preset("overlap", SHORT + ["loudness_gap_db=[6,6]"])
    for conversation in simulate_many(train_bank, config, 6, return_sources=True):
        clean = sum(conversation.sources.values())
        np.testing.assert_allclose(clean, conversation.audio, atol=1e-6)
        inside = np.zeros(clean.size, dtype=bool)
        for turn in conversation.turns:
            track = conversation.sources[turn.speaker][samples(turn)]
            assert np.sqrt(np.mean(track**2)) > 10 ** (-45 / 20), turn
            inside[samples(turn)] = True
        speech_rms = np.sqrt(np.mean(clean[inside] ** 2))
        outside = clean[~inside]
        assert outside.size == 0 or np.sqrt(np.mean(outside**2)) < speech_rms * 10 ** (-50 / 20)
        assert set(conversation.meta["speakers"]) == set(conversation.sources)


def test_reverb_keeps_the_direct_path_at_time_zero(train_bank: Bank) -> None:
    rooms = acoustics.load_rir_bank(4)
    assert rooms.num_rooms == 4 and acoustics.rir_bank_path(4).is_file()
    for room in range(rooms.num_rooms):
        for source in range(acoustics.SOURCES_PER_ROOM):
            rir = rooms.rir(room, source)
            assert np.sum(rir**2) == pytest.approx(1.0, rel=1e-4)
            assert np.argmax(np.abs(rir) > 0.3 * np.max(np.abs(rir))) <= 16
    config = load_preset("clean", SHORT + ["reverb.probability=1", "reverb.rooms=4", "reverb.rt60=[0.1,1.0]"])
    for conversation in simulate_many(train_bank, config, 3, return_sources=True):
        assert conversation.meta["reverb"]["rt60"] > 0
        for turn in conversation.turns:
            track = conversation.sources[turn.speaker][samples(turn)]
            assert np.sqrt(np.mean(track**2)) > 10 ** (-45 / 20)


def test_reverb_convolution_and_noise_buffers() -> None:
    rng = np.random.default_rng(0)
    for taps, length in [(1, 5), (1300, 40000), (8000, 100), (8000, 70000)]:
        rir = rng.standard_normal(taps).astype(np.float32)
        audio = rng.standard_normal(length).astype(np.float32)
        wet = acoustics.Reverb(rir).apply(audio)
        expected = np.convolve(audio.astype(np.float64), rir)
        assert wet.dtype == np.float32 and wet.shape == expected.shape
        np.testing.assert_allclose(wet, expected, atol=1e-3 * np.max(np.abs(expected)))
    buffer = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(acoustics.loop_slice(buffer, 7, 25), np.arange(7, 32) % 10)
    np.testing.assert_array_equal(acoustics.loop_slice(buffer, 12, 3), [2, 3, 4])
    for colour in acoustics.COLOURED_NOISES:
        noise = acoustics.coloured_noise(colour)
        assert noise.dtype == np.float32 and np.mean(noise**2) == pytest.approx(1.0, rel=1e-3)
    spectra = {c: np.abs(np.fft.rfft(acoustics.coloured_noise(c)[:SR])) ** 2 for c in acoustics.COLOURED_NOISES}
    low = {c: spectrum[50:500].sum() / spectrum[4000:7000].sum() for c, spectrum in spectra.items()}
    assert low["white"] < low["pink"] < low["brown"]


def test_babble_belongs_to_its_bank(tiny_bank: Path, train_bank: Bank) -> None:
    babble = train_bank.babble(3, 2.0)
    assert babble.dtype == np.float32 and babble.size == 2 * SR
    assert np.mean(np.square(babble, dtype=np.float64)) == pytest.approx(1.0, rel=1e-3)
    assert train_bank.babble(3, 2.0) is babble, "made once per bank"
    np.testing.assert_array_equal(Bank(tiny_bank, "train").babble(3, 2.0), babble)
    assert not np.array_equal(Bank(tiny_bank, "test").babble(3, 2.0), babble), "voices of the bank's own split"


def test_config_errors_are_one_type() -> None:
    with pytest.raises(ConfigError, match="probability"):
        TurnTakingConfig(interruption_probability=2.0)
    with pytest.raises(ConfigError, match="slice_fade_seconds"):
        load_preset("clean", ["slice_fade_seconds=-1"])
    with pytest.raises(ValueError):  # a ConfigError is also what Python code expects of a bad value
        load_preset("clean", ["nonspeech.fade_seconds=-1"])


def test_telephone_line_removes_the_high_band(train_bank: Bank) -> None:
    config = load_preset("phone", SHORT + ["noise.probability=0"])
    codecs = set()
    for conversation in simulate_many(train_bank, config, 6):
        codecs.add(conversation.meta["telephone"])
        spectrum = np.abs(np.fft.rfft(conversation.audio)) ** 2
        frequencies = np.fft.rfftfreq(conversation.audio.size, 1 / SR)
        assert spectrum[frequencies > 4200].sum() < 1e-3 * spectrum[(frequencies > 300) & (frequencies < 3400)].sum()
    assert codecs <= {"none", "mulaw", "gsm"} and len(codecs) >= 2


def test_layout_does_not_depend_on_noise_knobs(train_bank: Bank) -> None:
    quiet = simulate_conversation(train_bank, load_preset("clean", SHORT), conversation_rng(5, 0))
    noisy = simulate_conversation(train_bank, load_preset("clean", SHORT + ["noise.probability=1"]),
                                  conversation_rng(5, 0))
    assert quiet.turns == noisy.turns
    assert not np.array_equal(quiet.audio, noisy.audio)


def run_cli(*argv: str) -> int:
    return cli.main(["simulate", *map(str, argv)])


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_output_is_deterministic(tiny_bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ["duration=[5,6]", "num_speakers=[2,3]", "reverb.rooms=4"]
    common = ["--preset", "noisy", "--num", "3", "--bank", tiny_bank, *(f"--set={o}" for o in overrides)]
    assert run_cli(*common, "--seed", "7", "--out", tmp_path / "a") == 0
    assert run_cli(*common, "--seed", "7", "--out", tmp_path / "b") == 0
    assert run_cli(*common, "--seed", "8", "--out", tmp_path / "c") == 0
    a, b, c = (folder_digest(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) == {"manifest.json", *(f"noisy-0000{i}.{ext}" for i in range(3) for ext in ("wav", "rttm"))}
    assert a["noisy-00000.wav"] != c["noisy-00000.wav"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["split"] == "test" and manifest["config"]["duration"] == [5, 6]
    entry = manifest["conversations"][0]
    for key in ("overlap_ratio", "speech_ratio", "speakers", "noise", "reverb", "duration"):
        assert key in entry
    expected = fixed_conversations(Bank(tiny_bank, "test"), load_preset("noisy", overrides), 3, seed=7)
    rttm = read_rttm(tmp_path / "a" / "noisy-00002.rttm")["noisy-00002"]
    assert [(t.speaker, round(t.start, 3), round(t.end, 3)) for t in rttm] == [
        (t.speaker, round(t.start, 3), round(t.end, 3)) for t in expected[2].turns
    ]


@pytest.mark.parametrize("argv, message", [
    (["--bank", "{missing}"], "no speech bank"),
    (["--preset", "nope"], "unknown preset"),
    (["--set", "num_speakers=10", "--set", "duration=3"], "cannot all speak"),
    (["--set", "num_speakers=[4,2]"], "minimum is above maximum"),
    (["--set", "duration=-5"], "must be positive"),
    (["--set", "noise.snr_db=[20,5]"], "noise.snr_db"),
    (["--set", "turns.interruption_probability=1.5"], "probability"),
    (["--set", "noise.types={thunder: 1}"], "unknown entry 'thunder'"),
    (["--set", "turns.typo=1"], "unknown key 'typo'"),
    (["--set", "turns.same_speaker_gap_seconds=-0.1"], "must be non-negative"),
    (["--set", "num_speakers=5"], "hold 3"),
    (["--split", "dev"], "unknown split"),
    (["--num", "0"], "at least 1"),
    (["--voices", "recorded"], "no recorded speakers in split(s) test"),
])
def test_cli_rejects_bad_input(tiny_bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                               argv: list[str], message: str) -> None:
    argv = [a.replace("{missing}", str(tmp_path / "missing")) for a in argv]
    if "--bank" not in argv:
        argv += ["--bank", str(tiny_bank)]
    assert run_cli("--out", tmp_path / "out", *argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_stream_shards_across_workers_and_ranks(tiny_bank: Path) -> None:
    config = load_preset("clean", ["duration=[3,4]", "num_speakers=2"])

    def take(rank: int, count: int) -> list:
        stream = ConversationStream(tiny_bank, "train", config, seed=11, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        taken = []
        for conversation in loader:
            taken.append((conversation.meta["index"], hashlib.sha256(conversation.audio.tobytes()).hexdigest()))
            if len(taken) == count:
                return taken
        return taken

    first, second = take(0, 6), take(1, 6)
    indices = [i for i, _ in first + second]
    assert sorted(indices) == list(range(12))
    assert len({digest for _, digest in first + second}) == 12
    assert take(0, 6) == first


def test_curriculum_switches_presets_by_global_index(tiny_bank: Path) -> None:
    curriculum = Curriculum([
        CurriculumStage(start=0, presets={"clean": 1.0}, overrides=["duration=[3,4]"]),
        CurriculumStage(start=4, presets={"overlap": 1.0, "phone": 1.0}, overrides=["duration=[5,6]"]),
    ])
    stream = iter(ConversationStream(tiny_bank, "train", curriculum, seed=0))
    presets = [next(stream).meta["preset"] for _ in range(12)]
    assert presets[:4] == ["clean"] * 4 and set(presets[4:]) == {"overlap", "phone"}
    resumed = iter(ConversationStream(tiny_bank, "train", curriculum, seed=0, start_batch=10))
    assert next(resumed).meta["index"] == 10
    batches = iter(ConversationStream(tiny_bank, "train", curriculum, seed=0, batch_size=3, start_batch=1))
    assert [conversation.meta["index"] for conversation in next(batches)] == [3, 4, 5]
    with pytest.raises(ConfigError, match="must increase"):
        Curriculum([CurriculumStage(start=0), CurriculumStage(start=0)])
    with pytest.raises(ConfigError, match="at least one weight"):
        CurriculumStage(presets={"clean": 0.0})


def test_voices_filter_keeps_one_kind_and_can_leave_out_perturbed_copies(tiny_bank: Path) -> None:
    everyone = Bank(tiny_bank, "train")
    assert any(info.speaker.endswith("-pseudo") for info in everyone.speakers)
    as_recorded = Bank(tiny_bank, "train", kind="synthetic", perturbed=False)
    assert [info.speaker for info in as_recorded.speakers] == [
        info.speaker for info in everyone.speakers if not info.speaker.endswith("-pseudo")]
    with pytest.raises(NanodrzError, match="no tts speakers"):
        Bank(tiny_bank, "train", kind="tts")
