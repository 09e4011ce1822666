"""The utterance bank: single-speaker speech at 16 kHz with its speech regions, split by speaker.

Storage is one folder per source ("shard"): `audio.i16` holds every utterance back to back as raw
16-bit samples (memory-mapped, so reading an utterance is a slice, not a decode), and `index.json`
lists utterances (offset, length, speech regions) and speakers (split, base voice, perturbation).
A shard whose `index.json` exists is complete; `prepare` skips it on a re-run.

Pseudo-speakers are speakers whose utterances are another speaker's, rendered through a documented
perturbation (`Perturbation`) when read, so they cost no disk space.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import soxr

from nanodrz.audio import SAMPLE_RATE, normalize_level
from nanodrz.errors import NanodrzError
from nanodrz.fileio import write_json

BANK_VERSION = 1
SPLITS = ("train", "validation", "test")
BABBLE_SEED = 1234  # fixed, so that every process and DataLoader worker holds the same babble


@dataclass(frozen=True)
class Perturbation:
    """How a pseudo-speaker differs from its base voice.

    speed: resampling factor (>1 is faster and higher); it moves pitch and formants together,
        like a shorter or longer vocal tract, which changes perceived identity far more than pitch alone.
    tilt_db: spectral tilt from a first-order shelf, in dB at high frequencies (+ brighter, - darker).
    """

    speed: float = 1.0
    tilt_db: float = 0.0

    def is_identity(self) -> bool:
        return self.speed == 1.0 and self.tilt_db == 0.0


@dataclass
class SpeakerInfo:
    """A speaker (or pseudo-speaker) of the bank."""

    speaker: str
    split: str
    source: str
    base: str = ""
    kind: str = "tts"
    language: str = ""
    perturbation: Perturbation = field(default_factory=Perturbation)


def assign_split(base_speaker: str, held_out: bool, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> str:
    """Deterministic speaker split from a hash of the base voice's id.

    Held-out voices only go to test: they are never trained on and never used for a choice, and
    validation is where choices are made. Pseudo-speakers pass their base voice's id, so a perturbed
    copy of a test voice can never leak into training.
    """
    if held_out:
        return "test"
    digest = hashlib.sha256(base_speaker.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


class ShardWriter:
    """Appends utterances of one source to a new shard; `close()` publishes it atomically."""

    def __init__(self, bank_root: str | Path, shard: str, source: str):
        self.directory = Path(bank_root) / "shards" / shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self.source = source
        self._audio_path = self.directory / "audio.i16.partial"
        self._audio = open(self._audio_path, "wb")
        self._offset = 0
        self._utterances: list[dict] = []
        self._speakers: dict[str, SpeakerInfo] = {}

    def add_speaker(self, info: SpeakerInfo) -> None:
        if info.split not in SPLITS:
            raise ValueError(f"unknown split {info.split!r}")
        self._speakers[info.speaker] = info

    def add_utterance(self, utterance_id: str, speaker: str, audio: np.ndarray,
                      regions: np.ndarray, text: str = "") -> None:
        """Store 16 kHz mono audio (float in [-1, 1] or int16) with its speech regions in seconds."""
        if speaker not in self._speakers:
            raise ValueError(f"speaker {speaker!r} was not added")
        if audio.dtype != np.int16:
            audio = np.clip(np.round(np.asarray(audio, dtype=np.float32) * 32767.0), -32768, 32767)
            audio = audio.astype(np.int16)
        regions = np.asarray(regions, dtype=np.float32).reshape(-1, 2)
        self._audio.write(audio.astype("<i2").tobytes())
        self._utterances.append({
            "id": utterance_id,
            "speaker": speaker,
            "offset": self._offset,
            "length": int(audio.shape[0]),
            "regions": [[round(float(s), 3), round(float(e), 3)] for s, e in regions],
            "text": text,
        })
        self._offset += int(audio.shape[0])

    def close(self) -> None:
        self._audio.close()
        self._audio_path.replace(self.directory / "audio.i16")
        write_json(self.directory / "index.json", {
            "version": BANK_VERSION,
            "source": self.source,
            "sample_rate": SAMPLE_RATE,
            "speakers": [asdict(info) for info in self._speakers.values()],
            "utterances": self._utterances,
        })


def shard_is_complete(bank_root: str | Path, shard: str) -> bool:
    index = Path(bank_root) / "shards" / shard / "index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("version") == BANK_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def add_pseudo_speakers(bank_root: str | Path, shard: str, pseudo: list[SpeakerInfo]) -> None:
    """Record pseudo-speakers (perturbed copies of a shard's voices) in that shard's index, atomically."""
    index_path = Path(bank_root) / "shards" / shard / "index.json"
    index = json.loads(index_path.read_text())
    known = {s["speaker"] for s in index["speakers"]}
    for info in pseudo:
        if info.base not in known:
            raise ValueError(f"pseudo-speaker {info.speaker!r} has unknown base {info.base!r}")
    index["speakers"] = [s for s in index["speakers"] if not s.get("base") or s["base"] == s["speaker"]]
    index["speakers"] += [asdict(info) for info in pseudo]
    write_json(index_path, index)


class Bank:
    """Read-only view of the utterances of one or more splits, with O(1) random access.

    Utterances are addressed by a global integer index; each speaker (including pseudo-speakers) has
    an array of utterance indices. Audio comes back as float32 at 16 kHz with the speaker's
    perturbation applied, and regions come back in the perturbed time axis.
    """

    def __init__(self, root: str | Path, splits: tuple[str, ...] | str = "train", kind: str | None = None,
                 perturbed: bool = True):
        """`kind` ("tts" or "recorded") keeps only such voices; `perturbed=False` leaves out the
        pitch- and tempo-shifted copies, e.g. for a validation set of voices as they were recorded."""
        self.root = Path(root).expanduser()
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        for split in splits:
            if split not in SPLITS:
                raise NanodrzError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        self.splits = splits
        shard_dirs = sorted(p.parent for p in (self.root / "shards").glob("*/index.json"))
        if not shard_dirs:
            raise NanodrzError(f"no speech bank at {self.root} (run `nanodrz prepare` first)")
        self._memmaps: list[np.memmap] = []
        shard_of, offsets, lengths, region_start, region_count = [], [], [], [], []
        regions: list[list[float]] = []
        self.speakers: list[SpeakerInfo] = []
        utterances_by_speaker: list[list[int]] = []
        for shard_index, directory in enumerate(shard_dirs):
            index = json.loads((directory / "index.json").read_text())
            if index.get("version") != BANK_VERSION:
                raise NanodrzError(f"{directory} was written by another bank version; re-run `nanodrz prepare`")
            audio_path = directory / "audio.i16"
            self._memmaps.append(
                np.memmap(audio_path, dtype="<i2", mode="r") if audio_path.stat().st_size
                else np.zeros(0, dtype="<i2")
            )
            infos = [
                SpeakerInfo(**{**s, "perturbation": Perturbation(**s.get("perturbation", {}))})
                for s in index["speakers"]
            ]
            base_utterances: dict[str, list[int]] = {}
            for utterance in index["utterances"]:
                base_utterances.setdefault(utterance["speaker"], []).append(len(offsets))
                shard_of.append(shard_index)
                offsets.append(utterance["offset"])
                lengths.append(utterance["length"])
                region_start.append(len(regions))
                region_count.append(len(utterance["regions"]))
                regions.extend(utterance["regions"])
            for info in infos:
                if (info.split not in splits or (kind is not None and info.kind != kind)
                        or (not perturbed and not info.perturbation.is_identity())):
                    continue
                owned = base_utterances.get(info.base or info.speaker, [])
                if owned:
                    self.speakers.append(info)
                    utterances_by_speaker.append(owned)
        if not self.speakers:
            voices = f"{kind} speakers" if kind is not None else "speakers"
            raise NanodrzError(f"the speech bank at {self.root} has no {voices} in split(s) {', '.join(splits)}")
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._region_start = np.asarray(region_start, dtype=np.int64)
        self._region_count = np.asarray(region_count, dtype=np.int64)
        self._regions = np.asarray(regions, dtype=np.float32).reshape(-1, 2)
        self._utterances_by_speaker = [np.asarray(u, dtype=np.int64) for u in utterances_by_speaker]
        self._babble: dict[tuple[int, float], np.ndarray] = {}

    @property
    def num_speakers(self) -> int:
        return len(self.speakers)

    def utterances_of(self, speaker_index: int) -> np.ndarray:
        """Global utterance indices spoken by speaker `speaker_index` (pseudo-speakers share their base's)."""
        return self._utterances_by_speaker[speaker_index]

    def regions(self, utterance: int, speaker_index: int) -> np.ndarray:
        """Speech regions (K, 2) in seconds, in the time axis of `audio(utterance, speaker_index)`."""
        start = self._region_start[utterance]
        raw = self._regions[start:start + self._region_count[utterance]]
        return raw / np.float32(self.speakers[speaker_index].perturbation.speed)

    def raw_audio(self, utterance: int) -> np.ndarray:
        """The stored int16 samples of an utterance (a memory-mapped view, no copy)."""
        offset = self._offsets[utterance]
        return self._memmaps[self._shard_of[utterance]][offset:offset + self._lengths[utterance]]

    def audio(self, utterance: int, speaker_index: int) -> np.ndarray:
        """float32 samples at 16 kHz of `utterance` rendered as speaker `speaker_index`."""
        audio = self.raw_audio(utterance).astype(np.float32) * np.float32(1 / 32768)
        return apply_perturbation(audio, self.speakers[speaker_index].perturbation)

    def iter_speakers(self) -> Iterator[tuple[int, SpeakerInfo]]:
        return iter(enumerate(self.speakers))

    def babble(self, voices: int, seconds: float) -> np.ndarray:
        """`seconds` of `voices` of these speakers talking at once, unit RMS: babble noise drawn from the
        conversation's own split. Made on first use and kept, since a conversation needs only a stretch of it."""
        key = (voices, seconds)
        if key not in self._babble:
            rng = np.random.default_rng(BABBLE_SEED)
            length = int(seconds * SAMPLE_RATE)
            babble = np.zeros(length, dtype=np.float32)
            for _ in range(voices):
                speaker = int(rng.integers(self.num_speakers))
                utterances = self.utterances_of(speaker)
                position = 0
                while position < length:
                    audio = self.audio(int(utterances[rng.integers(utterances.size)]), speaker)
                    take = min(audio.size, length - position)
                    babble[position:position + take] += normalize_level(audio, -20.0)[:take]
                    position += max(take, SAMPLE_RATE)
            rms = math.sqrt(float(np.mean(np.square(babble, dtype=np.float64))))
            self._babble[key] = babble / np.float32(rms) if rms > 0 else babble
        return self._babble[key]


def apply_perturbation(audio: np.ndarray, perturbation: Perturbation) -> np.ndarray:
    """Render `audio` (float32, 16 kHz) through a pseudo-speaker perturbation."""
    if perturbation.speed != 1.0 and audio.size:
        # Playing faster by `speed` = reading the samples as if recorded at 16k*speed, then resampling.
        audio = soxr.resample(audio, SAMPLE_RATE * perturbation.speed, SAMPLE_RATE, quality="LQ")
        audio = np.ascontiguousarray(audio, dtype=np.float32)
    if perturbation.tilt_db != 0.0 and audio.size:
        audio = _tilt(audio, perturbation.tilt_db)
    return audio


def _tilt(audio: np.ndarray, tilt_db: float) -> np.ndarray:
    """First-order high shelf: x + g * highpass(x), g set so the top of the band moves by `tilt_db`."""
    gain = 10 ** (tilt_db / 20) - 1.0
    pole = 0.75  # one-pole highpass, unity gain at Nyquist, corner near 1 kHz at 16 kHz
    b = (1 + pole) / 2
    from scipy.signal import lfilter  # here: importing scipy.signal costs diarization's start-up 1.7 s

    highpassed = lfilter([b, -b], [1, -pole], audio).astype(np.float32)
    out = audio + np.float32(gain) * highpassed
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    return out / peak * 0.95 if peak > 1.0 else out
