"""espeak-ng: formant-synthesis variants and the installed MBROLA diphone voices, speaking English.

Most of espeak-ng's ~100 variants collapse onto a few identities (pitch alone does not make a new
speaker). The variants below are one per cluster of all variants embedded with CAM++ (agglomerative,
cosine 0.75); whispering and "Demonic" are left out as not conversational speech. MBROLA voices
are found at run time; `us3` is left out because it is the same identity as `us2`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from nanodrz.sources import Speaker, TextToSpeech, run_command

VARIANTS = ("", "f1", "f3", "m7", "klatt", "anika", "zac", "steph", "travis", "kaukovalta", "pablo", "Diogo",
            "Marco", "Alicia", "RicishayMax2", "robosoft6", "UniRobot")
MBROLA_DIR = Path("/usr/share/mbrola")
MBROLA_DUPLICATES = {"us3"}


def _voice_files(kind: str) -> set[str]:
    """File names espeak-ng lists for `--voices=<kind>` (e.g. "!v/f3", "mb/mb-us1-en")."""
    listing = subprocess.run(["espeak-ng", f"--voices={kind}"], capture_output=True, text=True, check=False).stdout
    return {token for line in listing.splitlines()[1:] for token in line.split() if "/" in token}


class Espeak(TextToSpeech):
    name = "espeak"
    requirement = "espeak-ng (and mbrola voices), fortunes"
    commands = ("espeak-ng",)

    def speakers(self) -> list[Speaker]:
        variants = _voice_files("variant")
        speakers = [
            Speaker(f"espeak-{variant.lower() or 'default'}", "en", voice=f"en+{variant}" if variant else "en")
            for variant in VARIANTS if not variant or f"!v/{variant}" in variants
        ]
        if shutil.which("mbrola") and MBROLA_DIR.is_dir():
            mbrola = _voice_files("mb")
            for database in sorted(p.name for p in MBROLA_DIR.iterdir() if re.fullmatch(r"[a-z]{2}\d", p.name)):
                if database in MBROLA_DUPLICATES:
                    continue
                for voice in (f"mb-{database}-en", f"mb-{database}"):
                    if f"mb/{voice}" in mbrola:
                        speakers.append(Speaker(f"espeak-mb-{database}", "en", voice=voice))
                        break
        return speakers

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        run_command(["espeak-ng", "-v", voice, "-w", str(path), sentence])
