"""Shared fixtures: a tiny speech bank of synthetic voices, and a cache folder that is not the user's.

The synthetic voices are glottal pulse trains through vowel formant filters. Each speaker has its
own pitch and vocal-tract length (formant scale), so speakers differ the way real ones do, and each
utterance has speech phrases separated by true silence, with exact speech regions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter

from nanodrz.bank import Perturbation, ShardWriter, SpeakerInfo, add_pseudo_speakers

SAMPLE_RATE = 16000
VOWEL_FORMANTS = np.array([  # F1, F2, F3 in Hz of a, e, i, o, u
    [730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240],
], dtype=np.float64)
FORMANT_BANDWIDTHS = np.array([80.0, 110.0, 160.0])


def synthetic_phrase(rng: np.random.Generator, f0: float, formant_scale: float) -> np.ndarray:
    """A run of 3-7 voiced syllables with a falling pitch contour, peak level about 0.5."""
    syllables = []
    for _ in range(int(rng.integers(3, 8))):
        length = int(rng.uniform(0.12, 0.28) * SAMPLE_RATE)
        time = np.arange(length) / SAMPLE_RATE
        pitch = f0 * (1.0 + 0.08 * rng.standard_normal()) * (1.0 - 0.3 * time)
        phase = np.cumsum(pitch / SAMPLE_RATE)
        pulses = np.diff(np.floor(phase), prepend=0.0) + 0.02 * rng.standard_normal(length)
        voiced = lfilter([1.0], [1.0, -0.95], pulses)  # glottal roll-off
        for formant, bandwidth in zip(VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))] * formant_scale,
                                      FORMANT_BANDWIDTHS):
            radius = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
            angle = 2 * np.pi * formant / SAMPLE_RATE
            voiced = lfilter([1.0 - radius], [1.0, -2 * radius * np.cos(angle), radius**2], voiced)
        syllables.append(voiced * np.hanning(length) ** 0.5)
    phrase = np.concatenate(syllables)
    return (0.5 * phrase / np.max(np.abs(phrase))).astype(np.float32)


def synthetic_utterance(rng: np.random.Generator, f0: float, formant_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """2-4 phrases with 0.25-0.7 s pauses of digital silence between them; (audio, regions in seconds)."""
    pieces = [np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE), dtype=np.float32)]
    regions = []
    position = pieces[0].size
    for index in range(int(rng.integers(2, 5))):
        if index:
            pause = np.zeros(int(rng.uniform(0.25, 0.7) * SAMPLE_RATE), dtype=np.float32)
            pieces.append(pause)
            position += pause.size
        phrase = synthetic_phrase(rng, f0, formant_scale)
        regions.append((position / SAMPLE_RATE, (position + phrase.size) / SAMPLE_RATE))
        pieces.append(phrase)
        position += phrase.size
    pieces.append(np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE), dtype=np.float32))
    return np.concatenate(pieces), np.asarray(regions)


def build_tiny_bank(root: str | Path, splits: dict[str, int] | None = None, utterances_per_speaker: int = 4,
                    pseudo_speakers: int = 2, seed: int = 0) -> Path:
    """Write a bank of synthetic speakers (default 6 train, 3 validation, 3 test) in two shards.

    `pseudo_speakers` perturbed copies of the first train speakers are added (speed and tilt), so code
    paths for pseudo-speakers are exercised too. Speaker ids are `syn-<split>-<n>`.
    """
    root = Path(root)
    splits = splits or {"train": 6, "validation": 3, "test": 3}
    rng = np.random.default_rng(seed)
    speakers = [(split, n) for split, count in splits.items() for n in range(count)]
    pitches = np.linspace(90.0, 260.0, len(speakers))[rng.permutation(len(speakers))]
    scales = np.linspace(0.85, 1.2, len(speakers))[rng.permutation(len(speakers))]
    writers = [ShardWriter(root, f"synthetic-{part}", source="synthetic") for part in "ab"]
    shard_of = {}
    for number, ((split, n), f0, scale) in enumerate(zip(speakers, pitches, scales)):
        speaker = f"syn-{split}-{n}"
        writer = writers[number % 2]
        shard_of[speaker] = f"synthetic-{'ab'[number % 2]}"
        writer.add_speaker(SpeakerInfo(speaker=speaker, split=split, source="synthetic", base=speaker,
                                       kind="synthetic", language="none"))
        for index in range(utterances_per_speaker):
            audio, regions = synthetic_utterance(rng, float(f0), float(scale))
            writer.add_utterance(f"{speaker}-{index}", speaker, audio, regions)
    for writer in writers:
        writer.close()
    train = [f"syn-train-{n}" for n in range(splits.get("train", 0))]
    pseudo_by_shard: dict[str, list[SpeakerInfo]] = {}
    for number, base in enumerate(train[:pseudo_speakers]):
        perturbation = Perturbation(speed=1.12 if number % 2 == 0 else 0.9, tilt_db=3.0 if number % 2 else -3.0)
        pseudo_by_shard.setdefault(shard_of[base], []).append(SpeakerInfo(
            speaker=f"{base}-pseudo", split="train", source="synthetic", base=base, kind="synthetic",
            language="none", perturbation=perturbation,
        ))
    for shard, pseudo in pseudo_by_shard.items():
        add_pseudo_speakers(root, shard, pseudo)
    return root


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder of a tiny synthetic bank (see `build_tiny_bank`), built once per test session."""
    return build_tiny_bank(tmp_path_factory.mktemp("bank"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model of a few thousand parameters saved as a checkpoint (step 7, 12 s inputs, 4-6 s chunks)."""
    from nanodrz.checkpoint import save_checkpoint
    from nanodrz.model import DiarizationModel, ModelConfig
    from nanodrz.tokenizer import Tokenizer, TokenizerConfig

    model_config = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_mels": 40}
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=12, num_speakers=4))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    config = {"model": model_config, "data": {"examples": {"chunk_seconds": [4, 6], "prompt_clip_seconds": [1.0, 2.0]}}}
    save_checkpoint(path, DiarizationModel(ModelConfig(**model_config), tokenizer), 7, config)
    return path


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point NANODRZ_CACHE at a temporary folder so tests never read or fill the user's cache."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANODRZ_CACHE", str(path))
        yield path


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (the suite shares its cores with other jobs), then restore the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
