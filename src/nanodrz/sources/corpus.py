"""A speech corpus on disk (`prepare --corpus PATH`), one folder per speaker; the layout is detected.

Recognised layouts: VCTK (`wav48*/pXXX/*.wav|flac`; only `_mic1` when both microphones are there),
LibriSpeech (`SPEAKER/CHAPTER/*.flac`), LibriTTS (`SPEAKER/CHAPTER/*.wav`), and plain speaker folders
(`SPEAKER/*.wav|flac|ogg|mp3`). Speakers are split by hash like every other voice.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from nanodrz.errors import NanodrzError
from nanodrz.sources import Recordings, Speaker

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3"}


def _audio_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "corpus"


class Corpus(Recordings):
    name = "corpus"
    requirement = "--corpus PATH"
    default_limit = 50

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise NanodrzError(f"corpus {self.path}: no such folder")
        if not self.path.is_dir():
            raise NanodrzError(f"corpus {self.path}: is a file, expected a folder with one folder per speaker")
        self.path = self.path.resolve()
        self.label = slug(self.path.name)
        self.layout, self._files = self._detect()
        if not self._files:
            raise NanodrzError(
                f"corpus {self.path}: no audio found (expected SPEAKER/*.wav, SPEAKER/CHAPTER/*.flac "
                f"as in LibriSpeech/LibriTTS, or wav48*/SPEAKER/ as in VCTK)")

    def _detect(self) -> tuple[str, dict[str, list[Path]]]:
        vctk = sorted(p for p in self.path.glob("wav48*") if p.is_dir())
        if vctk:
            files = {}
            for speaker_dir in _subfolders(vctk[-1]):
                audio = _audio_in(speaker_dir)
                mic1 = [p for p in audio if p.stem.endswith("_mic1")]
                files[speaker_dir.name] = mic1 or [p for p in audio if not p.stem.endswith("_mic2")]
            return "vctk", {k: v for k, v in files.items() if v}
        flat, nested = {}, {}
        for speaker_dir in _subfolders(self.path):
            audio = _audio_in(speaker_dir)
            if audio:
                flat[speaker_dir.name] = audio
            else:
                deeper = [p for chapter in _subfolders(speaker_dir) for p in _audio_in(chapter)]
                if deeper:
                    nested[speaker_dir.name] = deeper
        if len(nested) > len(flat):
            flac = sum(p.suffix.lower() == ".flac" for files in nested.values() for p in files)
            return ("librispeech" if 2 * flac >= sum(map(len, nested.values())) else "libritts"), nested
        return "speaker folders", flat

    @property
    def shard(self) -> str:
        return f"corpus-{self.label}-{hashlib.sha256(str(self.path).encode()).hexdigest()[:8]}"

    def available(self) -> bool:
        return True

    def scan(self) -> dict[Speaker, list[Path]]:
        return {Speaker(f"{self.label}-{name}", ""): files for name, files in self._files.items()}

    def recipe(self) -> dict:
        return {"path": str(self.path), "layout": self.layout}
