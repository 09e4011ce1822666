"""Fish Fillets NG: acted dialogue lines of real voices, Czech and Dutch (Debian fillets-ng-data-cs/-nl).

Files are `sound/<level>/<lang>/<prefix>-<speaker>-<line>.ogg` (or `<speaker>-<line>.ogg`); `m` is the
small fish, `v` the big fish. The Czech minor characters are played by a few actors, so the table
below groups characters into actors: characters whose mean CAM++ embeddings are within cosine 0.8
(average linkage) share one speaker. Characters with under ~15 s of speech are left out, as are
files without a speaker code in the name (the fish's help lines, numbered extra-level voices).

Held out (validation/test only): every Dutch voice, and every Czech voice except the two fish.
"""

from __future__ import annotations

from pathlib import Path

from nanodrz.sources import Recordings, Speaker

SOUND_DIR = Path("/usr/share/games/fillets-ng/sound")
LANGUAGES = ("cs", "nl")
FISH = {"m": "m", "v": "v"}
CZECH_MINOR_VOICES = {
    "hs": (("city", "hs"), ("pavement", "hs"), ("music", "hs"), ("captain", "leb")),
    "elevator-x": (("elevator1", "x"), ("elevator2", "x")),
    "gods": (("gods", "b1"), ("gods", "b2")),
    "kd": (("briefcase", "kd"), ("ending", "c")),
    "pap": (("cabin1", "pap"), ("cabin2", "pap"), ("viking2", "2")),
    "bathyscaph-p": (("bathyscaph", "p"),),
    "bathyscaph-s": (("bathyscaph", "s"),),
    "corridor-r": (("corridor", "r"),),
    "hole-l": (("hole", "l"),),
    "linux-1": (("linux", "1"),),
    "linux-2": (("linux", "2"),),
    "viking-1": (("viking2", "1"),),
    "viking-3": (("viking2", "3"),),
    "viking-4": (("viking2", "4"),),
    "start-x": (("start", "x"),),
}
_VOICE_OF_CHARACTER = {character: voice for voice, characters in CZECH_MINOR_VOICES.items()
                       for character in characters}


def speaker_code(stem: str) -> str | None:
    """The speaker code of a dialogue file name, or None when the name carries none."""
    parts = stem.split("-")
    if len(parts) == 3:
        return parts[1]
    if len(parts) == 2:
        return parts[0] if len(parts[0]) <= 3 else parts[1]
    return None


class FishFillets(Recordings):
    name = "fillets"
    requirement = "fillets-ng-data-cs and/or fillets-ng-data-nl"

    def available(self) -> bool:
        return any(SOUND_DIR.glob(f"*/{language}/*.ogg") for language in LANGUAGES)

    def scan(self) -> dict[Speaker, list[Path]]:
        files: dict[Speaker, list[Path]] = {}
        for language in LANGUAGES:
            for path in sorted(SOUND_DIR.glob(f"*/{language}/*.ogg")):
                level, code = path.parent.parent.name, speaker_code(path.stem)
                if code in FISH:
                    voice, held_out = FISH[code], language != "cs"
                elif language == "cs" and (level, code) in _VOICE_OF_CHARACTER:
                    voice, held_out = _VOICE_OF_CHARACTER[(level, code)], True
                else:
                    continue
                speaker = Speaker(f"fillets-{language}-{voice}", language, held_out=held_out)
                files.setdefault(speaker, []).append(path)
        return files

    def utterance_name(self, path: Path) -> str:
        return f"{path.parent.parent.name}-{path.stem}"
