"""Offline speech sources for the utterance bank: one small module per source, one interface.

A source says whether it is installed (`available()`), lists its speakers (`speakers()`), describes
a speaker's utterances without touching audio (`utterances(speaker, limit, seed)`), and produces one
utterance's audio (`load(utterance)`, where synthesis or decoding happens, in worker processes).
`prepare` turns what `load` returns into bank entries (16 kHz, level, speech regions).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import soundfile as sf

from nanodrz.audio import SAMPLE_RATE, load_audio, to_mono
from nanodrz.errors import NanodrzError
from nanodrz.sources import text


@dataclass(frozen=True)
class Speaker:
    """A voice of a source. `name` is its bank-wide id; `voice` is what the engine calls it."""

    name: str
    language: str
    held_out: bool = False  # validation/test only, never train
    voice: str = ""


@dataclass(frozen=True)
class Utterance:
    """What to render: a text for a TTS voice, or a recording's path (and, for sources of isolated
    words, the recordings said after it in a row)."""

    id: str
    speaker: str
    voice: str = ""
    text: str = ""
    path: str = ""
    followed_by: tuple[str, ...] = ()


class Source:
    """Base of all sources; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "tts" or "recorded"
    requirement: ClassVar[str]  # what to install, shown when the source is not available
    default_limit: ClassVar[int | None]  # utterances per speaker when `--max-utterances-per-voice` is not given
    validation_fraction: ClassVar[float] = 0.1  # share of voices (by hash) in the validation split
    test_fraction: ClassVar[float] = 0.1  # share of voices (by hash) in the test split

    @property
    def shard(self) -> str:
        """Name of this source's shard in the bank."""
        return self.name

    def available(self) -> bool:
        raise NotImplementedError

    def speakers(self) -> list[Speaker]:
        raise NotImplementedError

    def utterances(self, speaker: Speaker, limit: int | None, seed: int) -> list[Utterance]:
        raise NotImplementedError

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        """Mono float32 audio and its sample rate; a NanodrzError skips just this utterance."""
        raise NotImplementedError

    def recipe(self) -> dict:
        """What determines this source's shard besides the limit and seed (a change forces a rebuild)."""
        return {}


def seeded_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on `seed` and `key`, so a voice's choices never depend on the others."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


class TextToSpeech(Source):
    """A TTS engine run as a command per utterance, speaking cleaned fortunes (see `text`)."""

    kind = "tts"
    default_limit = 40
    commands: ClassVar[tuple[str, ...]]

    def available(self) -> bool:
        return all(shutil.which(command) for command in self.commands) and text.available()

    def utterances(self, speaker: Speaker, limit: int | None, seed: int) -> list[Utterance]:
        count = self.default_limit if limit is None else limit
        return [
            Utterance(f"{speaker.name}-{index:04d}", speaker.name, voice=speaker.voice, text=sentence)
            for index, sentence in enumerate(text.pick(speaker.name, count, seed))
        ]

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory(prefix="nanodrz-tts-") as directory:
            path = Path(directory) / "speech.wav"
            self.synthesize(utterance.voice, utterance.text, path)
            if not path.is_file() or path.stat().st_size <= 44:
                raise NanodrzError(f"{self.name} voice {utterance.voice!r} produced no audio")
            audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
        return to_mono(audio), rate

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        raise NotImplementedError


def run_command(command: list[str], stdin: str | None = None, timeout: float = 120.0) -> None:
    """Run an engine; its failure becomes a NanodrzError naming the program."""
    try:
        subprocess.run(command, input=stdin.encode("utf-8") if stdin is not None else None,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        reason = detail.decode("utf-8", "replace").strip().splitlines()[-1:] or [type(error).__name__]
        raise NanodrzError(f"{command[0]} failed: {reason[0]}") from None


class Recordings(Source):
    """Recorded speech: a fixed list of files per speaker."""

    kind = "recorded"
    default_limit = None

    def scan(self) -> dict[Speaker, list[Path]]:
        """The recordings of each speaker (called once; see `catalog`)."""
        raise NotImplementedError

    @functools.cached_property
    def catalog(self) -> dict[Speaker, list[Path]]:
        return {speaker: sorted(paths) for speaker, paths in self.scan().items() if paths}

    def speakers(self) -> list[Speaker]:
        return list(self.catalog)

    def utterances(self, speaker: Speaker, limit: int | None, seed: int) -> list[Utterance]:
        paths = self.catalog[speaker]
        if limit is not None and len(paths) > limit:
            chosen = np.sort(seeded_rng(seed, speaker.name).choice(len(paths), size=limit, replace=False))
            paths = [paths[i] for i in chosen]
        return [Utterance(f"{speaker.name}-{self.utterance_name(path)}", speaker.name, path=str(path))
                for path in paths]

    def utterance_name(self, path: Path) -> str:
        return path.stem

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        return load_audio(utterance.path), SAMPLE_RATE


def read_raw_pcm(path: str | Path) -> np.ndarray:
    """Headerless 16-bit little-endian mono PCM, as float32."""
    return np.fromfile(path, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def builtin_sources() -> dict[str, Source]:
    """Every built-in source by name, in the order `prepare` builds them (fast synthesis first)."""
    from nanodrz.sources.asterisk import Asterisk
    from nanodrz.sources.codec2 import Codec2Examples
    from nanodrz.sources.espeak import Espeak
    from nanodrz.sources.festival import Festival
    from nanodrz.sources.fillets import FishFillets
    from nanodrz.sources.flite import Flite
    from nanodrz.sources.klettres import KLettres
    from nanodrz.sources.pico import Pico
    from nanodrz.sources.pocketsphinx import PocketsphinxTestdata
    from nanodrz.sources.rhvoice import RHVoice

    sources = [Espeak(), Flite(), Pico(), Festival(), RHVoice(), FishFillets(), Asterisk(), KLettres(),
               Codec2Examples(), PocketsphinxTestdata()]
    return {source.name: source for source in sources}
