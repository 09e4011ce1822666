"""pocketsphinx-testdata: three people in the recognizer's test files, 16 kHz. All held out.

`librivox/` is one LibriVox reader; `cards/` one speaker; goforward, numbers, something and
tidigits/dhd are one more (dhd: the initials in the tidigits file name; CAM++ cosine 0.70-0.81).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.sources import Recordings, Speaker, Utterance, read_raw_pcm

DATA_DIR = Path("/usr/share/pocketsphinx/test/data")
SPEAKERS = {
    "librivox": ("librivox/*.wav",),
    "cards": ("cards/*.wav",),
    "dhd": ("goforward.raw", "numbers.raw", "something.raw", "tidigits/*.raw"),
}


class PocketsphinxTestdata(Recordings):
    name = "pocketsphinx"
    requirement = "pocketsphinx-testdata"

    def available(self) -> bool:
        return DATA_DIR.is_dir()

    def scan(self) -> dict[Speaker, list[Path]]:
        return {
            Speaker(f"pocketsphinx-{name}", "en", held_out=True): [p for pattern in patterns
                                                                    for p in DATA_DIR.glob(pattern)]
            for name, patterns in SPEAKERS.items()
        }

    def utterance_name(self, path: Path) -> str:
        return "-".join(path.relative_to(DATA_DIR).with_suffix("").parts)

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        if utterance.path.endswith(".raw"):
            return read_raw_pcm(utterance.path), SAMPLE_RATE
        return load_audio(utterance.path), SAMPLE_RATE
