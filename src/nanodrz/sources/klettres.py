"""KLettres: letters and syllables read by one person per language, 20 languages (Debian klettres-data).

The only recorded speech in packages that no nanodrz model has been trained on and that is not held
out, so half of its voices go to validation, where choices made on TTS voices alone did not carry
over to recorded ones (MODEL_CARD.md), and the rest to train. None go to test, which already holds
every held-out recording, so test sets stay the same files from one bank to the next.

Each language folder is one reader: CAM++ cosine between 6-letter stretches of a folder is 0.66 or
more, and at most 0.78 between folders. Isolated letters make poor turns, so an utterance is a few of
one reader's recordings said in a row, like someone spelling, each cut to its sound with a margin of
its own room tone, which makes the pause between letters. (Pauses of digital silence instead made
CAM++ hear the readers as alike: nearest other reader at cosine 0.65 on average, against 0.52.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.sources import Recordings, Speaker, Utterance, seeded_rng

SOUNDS_DIR = Path("/usr/share/klettres")


class KLettres(Recordings):
    name = "klettres"
    requirement = "klettres-data"
    validation_fraction = 0.5
    test_fraction = 0.0
    letters_per_utterance = 8
    trim_below_peak_db = 20.0  # a recording's lead-in and tail this far below its loudest frame are cut
    trim_margin_seconds = 0.15  # room tone kept on each side of a letter

    def available(self) -> bool:
        return any(SOUNDS_DIR.glob("*/*/*.ogg"))

    def scan(self) -> dict[Speaker, list[Path]]:
        files: dict[Speaker, list[Path]] = {}
        for folder in sorted(p for p in SOUNDS_DIR.iterdir() if p.is_dir()) if SOUNDS_DIR.is_dir() else []:
            recordings = sorted(folder.glob("*/*.ogg"))
            if recordings:
                language = folder.name.split("_")[0]
                files[Speaker(f"klettres-{folder.name.lower().replace('_', '-')}", language)] = recordings
        return files

    def utterances(self, speaker: Speaker, limit: int | None, seed: int) -> list[Utterance]:
        paths = self.catalog[speaker]
        order = seeded_rng(seed, speaker.name).permutation(len(paths))
        size = self.letters_per_utterance
        groups = [[str(paths[i]) for i in order[k:k + size]] for k in range(0, len(order), size)]
        groups = groups if limit is None else groups[:limit]
        return [Utterance(f"{speaker.name}-{k:03d}", speaker.name, path=group[0],
                          followed_by=tuple(group[1:])) for k, group in enumerate(groups)]

    def recipe(self) -> dict:
        return {"letters": self.letters_per_utterance, "trim_db": self.trim_below_peak_db,
                "margin": self.trim_margin_seconds, "split": [self.validation_fraction, self.test_fraction]}

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        paths = (utterance.path, *utterance.followed_by)
        return np.concatenate([trim_to_sound(load_audio(path), self.trim_below_peak_db, self.trim_margin_seconds)
                               for path in paths]), SAMPLE_RATE


def trim_to_sound(audio: np.ndarray, below_peak_db: float, margin_seconds: float,
                  frame_seconds: float = 0.02) -> np.ndarray:
    """The recording from its first to its last frame within `below_peak_db` of its loudest, with
    `margin_seconds` kept on each side.

    Some readers' files hold a second or more of room hiss before and after the letter, loud enough
    for the bank's voice activity detector to mark as speech.
    """
    frame = int(frame_seconds * SAMPLE_RATE)
    count = len(audio) // frame
    if count == 0:
        return audio
    energy = np.mean(audio[:count * frame].reshape(count, frame) ** 2, axis=1)
    level_db = 10.0 * np.log10(energy + 1e-12)
    loud = np.flatnonzero(level_db > level_db.max() - below_peak_db)
    margin = int(margin_seconds * SAMPLE_RATE)
    return audio[max(0, loud[0] * frame - margin):min(len(audio), (loud[-1] + 1) * frame + margin)]
