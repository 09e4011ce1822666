"""SVOX Pico (`pico2wave`): one voice per language, all six speaking English text."""

from __future__ import annotations

from pathlib import Path

from nanodrz.sources import Speaker, TextToSpeech, run_command

LANGUAGES = ("en-US", "en-GB", "de-DE", "es-ES", "fr-FR", "it-IT")
LANGUAGE_DIR = Path("/usr/share/pico/lang")


class Pico(TextToSpeech):
    name = "pico"
    requirement = "libttspico-utils (pico2wave), fortunes"
    commands = ("pico2wave",)

    def speakers(self) -> list[Speaker]:
        installed = {path.name.split("_")[0] for path in LANGUAGE_DIR.glob("*_ta.bin")}
        return [Speaker(f"pico-{language.lower()}", language.split("-")[0], voice=language)
                for language in LANGUAGES if language in installed]

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        run_command(["pico2wave", "-l", voice, "-w", str(path), sentence])
