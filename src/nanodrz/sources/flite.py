"""flite: CMU's small engine with its built-in voices (`flite -lv` lists them).

Left out: `kal` (the 8 kHz twin of kal16), `awb_time` (a talking clock), and `awb` and `slt`, which
are the same CMU ARCTIC speakers as RHVoice's alan and slt (one identity by CAM++); keeping one copy
of a person keeps a simulated conversation from holding the same voice under two labels.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from nanodrz.sources import Speaker, TextToSpeech, run_command

LEFT_OUT = {"kal", "awb_time", "awb", "slt"}


class Flite(TextToSpeech):
    name = "flite"
    requirement = "flite, fortunes"
    commands = ("flite",)

    def speakers(self) -> list[Speaker]:
        listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=False).stdout
        voices = listing.split(":", 1)[-1].split()
        return [Speaker(f"flite-{voice}", "en", voice=voice) for voice in sorted(voices) if voice not in LEFT_OUT]

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        run_command(["flite", "-voice", voice, "-t", sentence, "-o", str(path)])
