"""RHVoice: statistical-parametric voices in ten languages (`RHVoice-test`), speaking English text.

Voices are found from the installed `voice.info` files; the profile passed to the engine must be
the voice's `name=` (an unknown profile silently falls back to another voice). Non-English voices
read the English text with their own letter-to-sound rules, in their own voice (checked with CAM++:
a voice reading English and reading its own language embed at cosine 0.77-0.95 to each other).
Two voices are left out as copies of others: aleksandr-hq (= aleksandr) and evgeniy-rus
(= evgeniy-eng).
"""

from __future__ import annotations

import re
from pathlib import Path

from nanodrz.sources import Speaker, TextToSpeech, run_command

VOICES_DIR = Path("/usr/share/RHVoice/voices")
DUPLICATES = {"aleksandr-hq", "evgeniy-rus"}
LANGUAGES = {"English": "en", "Russian": "ru", "Ukrainian": "uk", "Polish": "pl", "Brazilian-Portuguese": "pt",
             "Albanian": "sq", "Esperanto": "eo", "Kyrgyz": "ky", "Macedonian": "mk", "Tatar": "tt"}


class RHVoice(TextToSpeech):
    name = "rhvoice"
    requirement = "RHVoice (RHVoice-test and voices), fortunes"
    commands = ("RHVoice-test",)

    def available(self) -> bool:
        return super().available() and VOICES_DIR.is_dir()

    def speakers(self) -> list[Speaker]:
        speakers = []
        for info in sorted(VOICES_DIR.glob("*/voice.info")):
            folder = info.parent.name
            fields = dict(re.findall(r"^(\w+)=(.*)$", info.read_text(encoding="utf-8"), re.MULTILINE))
            if folder.lower() in DUPLICATES or "name" not in fields:
                continue
            language = LANGUAGES.get(fields.get("language", ""), fields.get("language", "").lower())
            speakers.append(Speaker(f"rhvoice-{folder.lower()}", language, voice=fields["name"].strip()))
        return speakers

    def synthesize(self, voice: str, sentence: str, path: Path) -> None:
        run_command(["RHVoice-test", "-p", voice, "-o", str(path)], stdin=sentence)
