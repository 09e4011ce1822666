"""codec2-examples: short recordings of about a dozen people (radio amateurs and studio), 8 kHz.

All held out (validation/test only). Files are grouped into people by CAM++ similarity. Left out:
all.wav (a compilation of the others), hts.raw (hts1 followed by hts2), hts1a/hts2a (excerpts of
hts1/hts2), f2400/m2400 (codec output of forig/morig), ve9qrp_10s (an excerpt), and modem, tone and
test-frame files. david4.wav and vk2tpm_004.wav are modem signals too, not speech: their level is
steady within 1 dB from start to end, 64% and 94% of their energy lies in 1-2 kHz, and
segmentation-3.0 hears speech in none of their frames (WebRTC VAD, which marks the bank's speech
regions, took them for speech, so references marked a modem as a talker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.sources import Recordings, Speaker, Utterance, read_raw_pcm

CODEC2_DIR = Path("/usr/share/codec2")
SPEAKERS = {
    "hts1": ("raw/hts1.raw",),
    "hts2": ("raw/hts2.raw",),
    "mmt1": ("wav/mmt1.wav",),
    "morig": ("wav/morig.wav",),
    "forig": ("wav/forig.wav",),
    "big-dog": ("wav/big_dog.wav",),
    "cross": ("wav/cross.wav",),
    "ve9qrp": ("wav/ve9qrp.wav",),
    "vk5qi": ("wav/vk5qi.wav",),
    "kristoff": ("raw/kristoff.raw",),
    "g3plx": ("raw/g3plx.raw",),
    "cq-ref": ("raw/cq_ref.raw",),
    "speech-orig": ("raw/speech_orig_16k.wav",),
}


class Codec2Examples(Recordings):
    name = "codec2"
    requirement = "codec2-examples"

    def available(self) -> bool:
        return (CODEC2_DIR / "wav").is_dir() or (CODEC2_DIR / "raw").is_dir()

    def scan(self) -> dict[Speaker, list[Path]]:
        return {
            Speaker(f"codec2-{name}", "en", held_out=True): [CODEC2_DIR / f for f in files if (CODEC2_DIR / f).is_file()]
            for name, files in SPEAKERS.items()
        }

    def load(self, utterance: Utterance) -> tuple[np.ndarray, int]:
        if utterance.path.endswith(".raw"):
            return read_raw_pcm(utterance.path), 8000
        return load_audio(utterance.path), SAMPLE_RATE
