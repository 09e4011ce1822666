"""Asterisk telephony prompts: studio IVR recordings of seven people, 8 kHz.

Folders under /usr/share/asterisk/sounds are per language and speaker, but not one-to-one: Allison
recorded both en_US and es_MX. `es` (Colombian Spanish) and `fr` (Armelle) hold raw GSM files,
decoded with sox. Top-level folders that are only links into these (digits, letters, ...) and the
`silence` folders are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.errors import NanodrzError
from nanodrz.sources import Recordings, Speaker, Utterance

SOUNDS_DIR = Path("/usr/share/asterisk/sounds")
FOLDERS = {  # folder: (speaker, language)
    "en_US_f_Allison": ("allison", "en"),
    "es_MX_f_Allison": ("allison", "es"),
    "fr_CA_f_June": ("june", "fr"),
    "it_IT_f_Menardi": ("menardi", "it"),
    "it_IT_m_Carlo": ("carlo", "it"),
    "ru_RU_f_IvrvoiceRU": ("ivrvoice-ru", "ru"),
    "es": ("es-co", "es"),
    "fr": ("armelle", "fr"),
}
EXTENSIONS = {".wav", ".gsm"}


class Asterisk(Recordings):
    name = "asterisk"
    requirement = "asterisk-core-sounds-*-wav / asterisk-prompt-* (sox for the GSM ones)"

    def available(self) -> bool:
        return any((SOUNDS_DIR / folder).is_dir() for folder in FOLDERS)

    def scan(self) -> dict[Speaker, list[Path]]:
        files: dict[Speaker, list[Path]] = {}
        speakers: dict[str, Speaker] = {}
        for folder, (name, language) in FOLDERS.items():
            root = SOUNDS_DIR / folder
            for path in sorted(root.rglob("*")) if root.is_dir() else []:
                if (path.suffix not in EXTENSIONS or path.is_symlink() or "silence" in path.parts
                        or (path.suffix == ".gsm" and not shutil.which("sox"))):
                    continue
                speaker = speakers.setdefault(name, Speaker(f"asterisk-{name}", language))
                files.setdefault(speaker, []).append(path)
        return files

    def utterance_name(self, path: Path) -> str:
        return "-".join(path.relative_to(SOUNDS_DIR).with_suffix("").parts)

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        if not utterance.path.endswith(".gsm"):
            return load_audio(utterance.path), SAMPLE_RATE
        command = ["sox", "-t", "gsm", "-r", "8000", "-c", "1", utterance.path,
                   "-t", "raw", "-e", "signed-integer", "-b", "16", "-"]
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            raise NanodrzError(f"{utterance.path}: sox cannot decode it")
        return np.frombuffer(result.stdout, dtype="<i2").astype(np.float32) / np.float32(32768.0), 8000
