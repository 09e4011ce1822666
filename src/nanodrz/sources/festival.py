"""Festival: the voices installed under /usr/share/festival/voices, run through `text2wave`.

Left out as copies of a person kept elsewhere (one identity by CAM++): kal_diphone (= flite kal16)
and cmu_us_slt_arctic_hts (= RHVoice slt).
"""

from __future__ import annotations

from pathlib import Path

from nanodrz.sources import Speaker, TextToSpeech, run_command

VOICES_DIR = Path("/usr/share/festival/voices")
LEFT_OUT = {"kal_diphone", "cmu_us_slt_arctic_hts"}
LANGUAGES = {"english": "en", "us": "en", "spanish": "es", "russian": "ru", "italian": "it", "czech": "cs",
             "finnish": "fi", "catalan": "ca", "hindi": "hi", "marathi": "mr", "telugu": "te"}


class Festival(TextToSpeech):
    name = "festival"
    requirement = "festival with festvox voices (text2wave), fortunes"
    commands = ("text2wave",)

    def available(self) -> bool:
        return super().available() and VOICES_DIR.is_dir()

    def speakers(self) -> list[Speaker]:
        return [
            Speaker(f"festival-{voice.name}", LANGUAGES.get(voice.parent.name, voice.parent.name), voice=voice.name)
            for voice in sorted(VOICES_DIR.glob("*/*"))
            if voice.is_dir() and voice.name not in LEFT_OUT
        ]

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        text_path = path.with_suffix(".txt")
        text_path.write_text(sentence + "\n", encoding="utf-8")
        run_command(["text2wave", "-eval", f"(voice_{voice})", str(text_path), "-o", str(path)])
