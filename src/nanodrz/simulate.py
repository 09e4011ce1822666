"""Synthetic conversations mixed from the speech bank: audio, reference turns (RTTM) and statistics.

A conversation is planned first (who speaks which utterance slice when), then rendered (levels,
room, noise, telephone line). The turn-taking model follows the spirit of Landini et al. (2022,
"From simulated mixtures to simulated conversations") and NeMo's speech_data_simulator: the same
speaker goes on after a pause, another speaker takes over after a gap or interrupts (starts before
the current turn ends), and listeners drop short backchannels into the current speaker's turn.

Reference turns are the bank's speech regions of every slice placed in the mix, so the RTTM marks
speech and not the silences inside utterances. Named presets (`--preset`) set difficulty; every knob
can be changed with `--set key=value` (e.g. `--set turns.interruption_probability=0.3`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from nanodrz import acoustics, nonspeech
from nanodrz.annotation import Turn, sort_turns, write_rttm
from nanodrz.audio import SAMPLE_RATE, normalize_level, write_audio
from nanodrz.bank import SPLITS, Bank, apply_perturbation
from nanodrz.config import apply_overrides, from_dict, read_yaml, to_dict
from nanodrz.errors import NanodrzError
from nanodrz.fileio import write_json
from nanodrz.paths import default_bank_dir

PRESET_DIR = Path(__file__).parent / "presets"
MIN_SECONDS_PER_SPEAKER = 1.0
FADE_SECONDS = 0.01
MIN_SAME_SPEAKER_GAP = 0.15
BABBLE_SEED = 1234
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration


def _check_range(name: str, value: tuple[float, float], low: float | None = None, high: float | None = None) -> None:
    if value[0] > value[1]:
        raise NanodrzError(f"{name} {list(value)}: minimum is above maximum")
    if low is not None and value[0] < low:
        raise NanodrzError(f"{name} {list(value)}: values must be at least {low}")
    if high is not None and value[1] > high:
        raise NanodrzError(f"{name} {list(value)}: values must be at most {high}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise NanodrzError(f"{name} = {value}: a probability must lie in [0, 1]")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise NanodrzError(f"{name} = {value}: must be {'non-negative' if allow_zero else 'positive'}")


def _check_weights(name: str, weights: dict[str, float], known: tuple[str, ...]) -> None:
    for key, weight in weights.items():
        if key not in known:
            raise NanodrzError(f"{name}: unknown entry {key!r} (choose from {', '.join(known)})")
        _check_positive(f"{name}.{key}", weight, allow_zero=True)
    if sum(weights.values()) <= 0:
        raise NanodrzError(f"{name}: at least one weight must be positive")


def as_range(value: float | tuple[float, float]) -> tuple[float, float]:
    """A knob given as one value or as [min, max], as (min, max)."""
    return (value, value) if isinstance(value, (int, float)) else (value[0], value[1])


@dataclass
class TurnTakingConfig:
    """Who speaks next, after how much silence, and how much speakers overlap. Times in seconds."""

    speaker_change_probability: float = 0.8  # chance the next turn is another speaker's
    dominance: float = 2.0  # Dirichlet concentration of speakers' shares of turns: low = one speaker dominates
    turn_seconds: float = 4.0  # mean target turn length (exponential); whole speech regions are taken up to it
    max_turn_seconds: float = 15.0  # slices are cut here, even inside a speech region
    pause_seconds: float = 0.5  # mean pause before the same speaker goes on (exponential)
    gap_seconds: float = 0.4  # mean gap before another speaker takes the turn (exponential)
    max_silence_seconds: float = 2.5  # cap on pauses and gaps
    interruption_probability: float = 0.1  # chance that a change of speaker starts before the turn ends
    overlap_seconds: float = 0.7  # mean overlap of an interruption (exponential), at most 90% of either turn
    # if set, replaces the two knobs above: a change of speaker overlaps the current turn by just enough
    # to bring the running overlap ratio (overlapped speech / speech) to the target, when it is below it
    target_overlap_ratio: float | None = None
    backchannels_per_minute: float = 0.0  # short interjections by listeners inside the current turn
    backchannel_seconds: tuple[float, float] = (0.3, 0.9)
    lead_silence_seconds: tuple[float, float] = (0.0, 1.0)  # silence before the first turn

    def __post_init__(self) -> None:
        _check_probability("turns.speaker_change_probability", self.speaker_change_probability)
        _check_probability("turns.interruption_probability", self.interruption_probability)
        _check_positive("turns.dominance", self.dominance)
        _check_positive("turns.turn_seconds", self.turn_seconds)
        _check_positive("turns.max_turn_seconds", self.max_turn_seconds)
        for name in ("pause_seconds", "gap_seconds", "max_silence_seconds", "overlap_seconds",
                     "backchannels_per_minute"):
            _check_positive(f"turns.{name}", getattr(self, name), allow_zero=True)
        if self.target_overlap_ratio is not None and not 0.0 <= self.target_overlap_ratio < 1.0:
            raise NanodrzError(f"turns.target_overlap_ratio = {self.target_overlap_ratio}: must lie in [0, 1)")
        _check_range("turns.backchannel_seconds", self.backchannel_seconds, low=0.05)
        _check_range("turns.lead_silence_seconds", self.lead_silence_seconds, low=0.0)


@dataclass
class NoiseConfig:
    """Background noise, each source added at its own SNR to the speech (measured over speech)."""

    probability: float = 0.0  # chance a conversation has background noise at all
    sources: int | tuple[int, int] = 1  # how many noises are mixed in, fixed or [min, max]
    types: dict[str, float] = field(
        default_factory=lambda: {"white": 1.0, "pink": 1.0, "brown": 1.0, "babble": 1.0, "music": 1.0}
    )  # weights; babble is made of bank voices, music read from music_dirs
    snr_db: tuple[float, float] = (5.0, 25.0)
    babble_voices: int = 6
    music_dirs: list[str] = field(default_factory=lambda: ["/usr/share/asterisk/moh"])

    def __post_init__(self) -> None:
        _check_probability("noise.probability", self.probability)
        _check_range("noise.sources", as_range(self.sources), low=1)
        _check_weights("noise.types", self.types, acoustics.NOISE_TYPES)
        _check_range("noise.snr_db", self.snr_db, low=-20.0, high=80.0)
        if self.babble_voices < 1:
            raise NanodrzError(f"noise.babble_voices = {self.babble_voices}: must be at least 1")


@dataclass
class ReverbConfig:
    """Rooms: each speaker gets a position in one simulated room, its speech the RIR from there."""

    probability: float = 0.0
    rt60: tuple[float, float] = (0.2, 0.8)  # seconds; rooms are drawn among those within the range
    rooms: int = 64  # size of the room bank simulated once and cached under the cache directory

    def __post_init__(self) -> None:
        _check_probability("reverb.probability", self.probability)
        _check_range("reverb.rt60", self.rt60, low=0.0, high=3.0)
        if self.rooms < 1:
            raise NanodrzError(f"reverb.rooms = {self.rooms}: must be at least 1")


@dataclass
class TelephoneConfig:
    """A narrow-band channel (8 kHz, 300-3400 Hz) with an optional codec, applied to the whole mix."""

    probability: float = 0.0
    codecs: dict[str, float] = field(default_factory=lambda: {"none": 1.0, "mulaw": 1.0, "gsm": 1.0})

    def __post_init__(self) -> None:
        _check_probability("telephone.probability", self.probability)
        _check_weights("telephone.codecs", self.codecs, acoustics.CODECS)


@dataclass(frozen=True)
class NonSpeechConfig:
    """Sounds that are not speech (see `nanodrz.nonspeech`): in the audio, never in the reference.

    Levels are the sound's active level (RMS while it sounds) in dB relative to the conversation's
    speech level (`level_dbfs`), which is drawn even for recordings without speech.
    """

    probability: float = 0.0  # chance a conversation with speech gets non-speech sounds
    sounds: int | tuple[int, int] = (1, 3)  # how many, fixed or [min, max]
    types: dict[str, float] = field(default_factory=lambda: {kind: 1.0 for kind in nonspeech.KINDS})  # weights
    level_db: tuple[float, float] = (-20.0, 0.0)  # relative to the speech level
    babble_level_db: tuple[float, float] = (-30.0, -15.0)  # babble of bank voices stays low
    gap_probability: float = 0.6  # chance a sound fills part of a silent stretch between turns (else under everything)
    min_gap_seconds: float = 0.3  # shortest silent stretch a sound goes into
    burst_seconds: tuple[float, float] = (0.3, 4.0)  # length of a sound between turns (cut to the stretch)
    no_speech_probability: float = 0.0  # chance a recording has no speech at all: non-speech only, empty reference
    babble_voices: int = 6
    music_dirs: list[str] = field(default_factory=lambda: ["/usr/share/asterisk/moh"])
    effect_dirs: list[str] = field(default_factory=lambda: ["/usr/share/sounds/freedesktop/stereo"])
    effect_exclude: list[str] = field(default_factory=lambda: ["audio-channel-*", "audio-test-signal.*"])  # spoken

    def __post_init__(self) -> None:
        _check_probability("nonspeech.probability", self.probability)
        _check_probability("nonspeech.gap_probability", self.gap_probability)
        _check_probability("nonspeech.no_speech_probability", self.no_speech_probability)
        _check_range("nonspeech.sounds", as_range(self.sounds), low=1, high=20)
        _check_weights("nonspeech.types", self.types, nonspeech.KINDS)
        _check_range("nonspeech.level_db", self.level_db, low=-60.0, high=20.0)
        _check_range("nonspeech.babble_level_db", self.babble_level_db, low=-60.0, high=20.0)
        _check_positive("nonspeech.min_gap_seconds", self.min_gap_seconds)
        _check_range("nonspeech.burst_seconds", self.burst_seconds, low=0.05)
        if self.babble_voices < 1:
            raise NanodrzError(f"nonspeech.babble_voices = {self.babble_voices}: must be at least 1")


@dataclass
class SimulationConfig:
    """Every knob of the conversation simulator; presets in src/nanodrz/presets/*.yaml set subsets."""

    num_speakers: int | tuple[int, int] = (2, 3)  # fixed or [min, max]
    duration: float | tuple[float, float] = (15.0, 25.0)  # seconds, fixed or [min, max]
    level_dbfs: tuple[float, float] = (-30.0, -20.0)  # speech level of the conversation
    loudness_gap_db: tuple[float, float] = (0.0, 6.0)  # spread of per-speaker levels around it
    utterance_level_jitter_db: float = 1.0  # each slice's level varies by up to this much
    turns: TurnTakingConfig = field(default_factory=TurnTakingConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    telephone: TelephoneConfig = field(default_factory=TelephoneConfig)
    nonspeech: NonSpeechConfig = field(default_factory=NonSpeechConfig)

    def __post_init__(self) -> None:
        speakers = as_range(self.num_speakers)
        _check_range("num_speakers", speakers, low=1)
        duration = as_range(self.duration)
        _check_range("duration", duration)
        if duration[0] <= 0:
            raise NanodrzError(f"duration {list(duration)}: must be positive")
        if speakers[1] * MIN_SECONDS_PER_SPEAKER > duration[0]:
            raise NanodrzError(
                f"{speakers[1]} speakers cannot all speak in {duration[0]:g} s "
                f"(allow {MIN_SECONDS_PER_SPEAKER:g} s per speaker: raise duration or lower num_speakers)"
            )
        _check_range("level_dbfs", self.level_dbfs, low=-60.0, high=0.0)
        _check_range("loudness_gap_db", self.loudness_gap_db, low=0.0)
        _check_positive("utterance_level_jitter_db", self.utterance_level_jitter_db, allow_zero=True)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> SimulationConfig:
    """A named preset (or a YAML file with the same keys) with `key=value` overrides applied."""
    path = Path(name)
    if not (name.endswith((".yaml", ".yml")) and path.is_file()):
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise NanodrzError(f"unknown preset {name!r} (choose from {', '.join(preset_names())} or a YAML file)")
    data = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(SimulationConfig, data, f"preset {name}")


# --------------------------------------------------------------------------------------------------
# The conversation


@dataclass
class Conversation:
    """A mixed conversation: float32 audio, its reference turns and what went into it.

    `sources` (only when asked for) holds each speaker's signal as it reaches the microphone, after
    level, room and the final peak scaling, before noise and telephone line; without noise or line,
    `audio` is their sum.
    """

    audio: np.ndarray
    sample_rate: int
    turns: list[Turn]
    meta: dict[str, Any]
    sources: dict[str, np.ndarray] | None = None

    @property
    def duration(self) -> float:
        return self.audio.shape[0] / self.sample_rate


@dataclass
class _Piece:
    """A slice of one utterance placed in the conversation (times in seconds)."""

    speaker: int  # index among the conversation's speakers
    utterance: int
    source_start: float  # where the slice starts in the utterance
    source_end: float
    start: float  # where it starts in the conversation
    regions: np.ndarray  # (K, 2) speech regions relative to source_start, within the slice
    kind: str  # "turn", "interruption" or "backchannel"


def check_bank(bank: Bank, config: SimulationConfig) -> None:
    needed = as_range(config.num_speakers)[1]
    if needed > bank.num_speakers:
        raise NanodrzError(
            f"the configuration asks for up to {needed} speakers but split(s) {', '.join(bank.splits)} "
            f"of the bank at {bank.root} hold {bank.num_speakers}"
        )


def simulate_conversation(bank: Bank, config: SimulationConfig, rng: np.random.Generator,
                          return_sources: bool = False) -> Conversation:
    """One conversation; the same `rng` state gives the same conversation, sample for sample.

    The layout, levels, room, noise and telephone line draw from separate child streams of `rng`,
    so changing e.g. the noise knobs leaves who-speaks-when untouched.
    """
    check_bank(bank, config)
    layout_rng, level_rng, room_rng, noise_rng, line_rng, nonspeech_rng = rng.spawn(6)
    low, high = as_range(config.num_speakers)
    num_speakers = int(layout_rng.integers(low, high + 1))
    duration_seconds = float(layout_rng.uniform(*as_range(config.duration)))
    speech_free = nonspeech_rng.random() < config.nonspeech.no_speech_probability
    if speech_free:
        num_speakers = 0
    speakers = _choose_speakers(bank, num_speakers, layout_rng) if num_speakers else []
    pieces = _Planner(bank, speakers, duration_seconds, config.turns, layout_rng).plan() if speakers else []
    length = int(round(duration_seconds * SAMPLE_RATE))
    labels = [bank.speakers[s].speaker for s in speakers]

    level = float(level_rng.uniform(*config.level_dbfs))
    spread = float(level_rng.uniform(*config.loudness_gap_db))
    offsets = level_rng.uniform(-spread / 2, spread / 2, size=num_speakers)
    reverbs, reverb_meta = _choose_room(config.reverb, num_speakers, room_rng)

    mix = np.zeros(length, dtype=np.float32)
    tracks = np.zeros((num_speakers, length), dtype=np.float32) if return_sources else None
    turns: list[Turn] = []
    kinds: list[str] = []
    jitter = config.utterance_level_jitter_db
    for piece in pieces:
        gain_db = level + offsets[piece.speaker] + level_rng.uniform(-jitter, jitter)
        reverb = None if reverbs is None else reverbs[piece.speaker]
        placed = _render_piece(bank, speakers[piece.speaker], piece, gain_db, reverb, mix, tracks,
                               labels[piece.speaker])
        turns.extend(placed)
        if placed:
            kinds.append(piece.kind)
    turns = sort_turns(turns)
    speech, overlap_seconds = speech_activity(turns)
    speech_samples = [(int(round(s * SAMPLE_RATE)), int(round(e * SAMPLE_RATE))) for s, e in speech]
    speech_power = _power(mix, speech_samples)

    noise_meta = _add_noise(bank, config.noise, mix, speech_power, speech_samples, noise_rng)
    nonspeech_meta = []
    if speech_free or nonspeech_rng.random() < config.nonspeech.probability:
        low, high = as_range(config.nonspeech.sounds)
        nonspeech_meta = nonspeech.add_sounds(
            mix, config.nonspeech, speech, level, nonspeech_rng,
            functools.partial(_babble, bank, config.nonspeech.babble_voices), int(nonspeech_rng.integers(low, high + 1)))
    codec = None
    if line_rng.random() < config.telephone.probability:
        codec = _weighted_choice(config.telephone.codecs, line_rng)
        mix = acoustics.telephone(mix, codec)

    peak = float(np.max(np.abs(mix))) if mix.size else 0.0
    peak_gain = min(1.0, 0.99 / peak) if peak > 0 else 1.0
    if peak_gain < 1.0:
        mix *= np.float32(peak_gain)
        if tracks is not None:
            tracks *= np.float32(peak_gain)

    speech_seconds = sum(e - s for s, e in speech)
    first_seen = list(dict.fromkeys(t.speaker for t in turns))
    meta = {
        "duration": round(length / SAMPLE_RATE, 3),
        "num_speakers": len(first_seen),
        "speakers": first_seen,
        "speech_seconds": round(speech_seconds, 3),
        "speech_ratio": round(speech_seconds / (length / SAMPLE_RATE), 4),
        "overlap_seconds": round(overlap_seconds, 3),
        "overlap_ratio": round(overlap_seconds / speech_seconds, 4) if speech_seconds else 0.0,
        "turns": len(turns),
        "interruptions": kinds.count("interruption"),
        "backchannels": kinds.count("backchannel"),
        "level_dbfs": round(level, 2),
        "speaker_gain_db": {labels[i]: round(float(offsets[i]), 2) for i in range(num_speakers)},
        "reverb": reverb_meta,
        "noise": noise_meta,
        "nonspeech": nonspeech_meta,
        "telephone": codec,
        "peak_gain_db": round(20 * math.log10(peak_gain), 2),
    }
    sources = None
    if tracks is not None:
        sources = {labels[i]: tracks[i] for i in range(num_speakers)}
    return Conversation(mix, SAMPLE_RATE, turns, meta, sources)


def _choose_speakers(bank: Bank, count: int, rng: np.random.Generator) -> list[int]:
    """`count` bank speakers, with distinct base voices whenever the split has enough of them."""
    order = rng.permutation(bank.num_speakers)
    chosen: list[int] = []
    bases: set[str] = set()
    for index in order:
        info = bank.speakers[index]
        base = info.base or info.speaker
        if base not in bases:
            chosen.append(int(index))
            bases.add(base)
            if len(chosen) == count:
                return chosen
    chosen += [int(i) for i in order if int(i) not in chosen][: count - len(chosen)]
    return chosen


class _Planner:
    """Lays out one conversation: which utterance slice each speaker says, and when.

    Every speaker's first turn comes within the first `len(speakers)` turns and is short enough to
    fit, so the requested speaker count always shows up in the reference. The "frontier" is the
    latest end of any turn so far; the next turn starts a pause or gap after it, or an overlap
    before it (an interruption).
    """

    def __init__(self, bank: Bank, speakers: list[int], duration: float, turns: TurnTakingConfig,
                 rng: np.random.Generator):
        self.bank, self.speakers, self.duration, self.turns, self.rng = bank, speakers, duration, turns, rng
        self.count = len(speakers)
        self.weights = rng.dirichlet(np.full(self.count, turns.dominance)) if self.count > 1 else np.ones(1)
        self.introductions = rng.permutation(self.count)
        self.lead = min(float(rng.uniform(*turns.lead_silence_seconds)), 0.2 * duration)
        self.budget = (duration - self.lead) / self.count  # time each speaker's first turn may use
        self.busy_until = np.full(self.count, -np.inf)
        self.frontier, self.frontier_length, self.last = self.lead, 0.0, -1
        self.activity = _Activity(duration)
        self.pieces: list[_Piece] = []

    def plan(self) -> list[_Piece]:
        turns, rng = self.turns, self.rng
        index = 0
        while True:
            introducing = index < self.count
            speaker = int(self.introductions[index]) if introducing else self._next_speaker()
            cap = 0.6 * self.budget if introducing else turns.max_turn_seconds
            target = min(float(rng.exponential(turns.turn_seconds)), cap)
            utterance, source_start, source_end, regions = _pick_slice(self.bank, self.speakers[speaker], target,
                                                                       cap, rng)
            length = source_end - source_start
            max_silence = turns.max_silence_seconds
            if introducing:
                max_silence = min(max_silence, 0.3 * self.budget)
            if index == 0:
                start = self.lead
            elif speaker == self.last:
                start = self.frontier + min(float(rng.exponential(turns.pause_seconds)), max_silence)
            else:
                start = self._speaker_change_start(length, regions, max_silence)
            start = max(start, self.busy_until[speaker] + MIN_SAME_SPEAKER_GAP)
            if start >= self.duration:
                return self.pieces
            kind = "interruption" if index and start < self.frontier else "turn"
            self._place(_Piece(speaker, utterance, source_start, source_end, start, regions, kind))
            if start + length > self.frontier:
                self.frontier, self.frontier_length = start + length, length
            self.last = speaker
            self._add_backchannels(speaker, start, length)
            index += 1

    def _next_speaker(self) -> int:
        """The same speaker again, or another one drawn by their share of the conversation."""
        if self.count == 1 or self.rng.random() >= self.turns.speaker_change_probability:
            return self.last
        others = self.weights.copy()
        others[self.last] = 0.0
        chosen = int(np.searchsorted(np.cumsum(others), self.rng.random() * others.sum(), side="right"))
        return min(chosen, self.count - 1)

    def _speaker_change_start(self, length: float, regions: np.ndarray, max_silence: float) -> float:
        """Start of another speaker's turn: a gap after the frontier, or an overlap before it."""
        turns = self.turns
        overlap = float(self.rng.exponential(turns.overlap_seconds))
        if turns.target_overlap_ratio is not None:
            speech = float(np.sum(regions[:, 1] - regions[:, 0]))
            overlap = self.activity.overlap_deficit(turns.target_overlap_ratio, speech)
            interrupt = overlap > 0
        else:
            interrupt = self.rng.random() < turns.interruption_probability
        if interrupt:
            return self.frontier - min(overlap, 0.9 * min(self.frontier_length, length))
        return self.frontier + min(float(self.rng.exponential(turns.gap_seconds)), max_silence)

    def _add_backchannels(self, speaker: int, start: float, length: float) -> None:
        """Short slices by listeners, placed inside the turn just planned."""
        rate = self.turns.backchannels_per_minute
        if self.count == 1 or rate <= 0:
            return
        for _ in range(int(self.rng.poisson(rate / 60.0 * length))):
            listener = int(self.rng.integers(self.count - 1))
            listener += listener >= speaker
            wanted = float(self.rng.uniform(*self.turns.backchannel_seconds))
            utterance, source_start, source_end, regions = _pick_slice(
                self.bank, self.speakers[listener], wanted, wanted, self.rng)
            earliest = max(start + 0.2 * length, self.busy_until[listener] + MIN_SAME_SPEAKER_GAP)
            latest = start + length - (source_end - source_start) - 0.1
            if latest > earliest:
                at = float(self.rng.uniform(earliest, latest))
                self._place(_Piece(listener, utterance, source_start, source_end, at, regions, "backchannel"))

    def _place(self, piece: _Piece) -> None:
        self.pieces.append(piece)
        self.busy_until[piece.speaker] = piece.start + piece.source_end - piece.source_start
        self.activity.add(piece.start, piece.regions)


class _Activity:
    """Running count of speech and overlapped speech on a 10 ms grid, to steer towards an overlap ratio."""

    def __init__(self, duration: float):
        self.counts = np.zeros(int(math.ceil(duration * 100)) + 1, dtype=np.int16)
        self.speech = 0
        self.overlap = 0

    def add(self, start: float, regions: np.ndarray) -> None:
        for first, last in np.round((start + regions) * 100).astype(np.int64):
            frames = self.counts[first:last]
            self.speech += int(np.count_nonzero(frames == 0))
            self.overlap += int(np.count_nonzero(frames == 1))
            frames += 1

    def overlap_deficit(self, target: float, speech: float) -> float:
        """Seconds of overlap a new turn with `speech` seconds of speech needs to bring the ratio to `target`.

        From (overlap + x) / (speech so far + speech - x) = target.
        """
        return (target * (self.speech / 100 + speech) - self.overlap / 100) / (1 + target)


def _pick_slice(bank: Bank, speaker_index: int, target: float, cap: float,
                rng: np.random.Generator) -> tuple[int, float, float, np.ndarray]:
    """A random utterance of the speaker, cut from one speech region's start to a later region's end.

    Whole regions are added while the slice stays within `target` (at least one region is taken);
    a slice longer than `cap` is cut there, inside its last region.
    """
    utterances = bank.utterances_of(speaker_index)
    for _ in range(20):
        utterance = int(utterances[rng.integers(utterances.size)])
        regions = bank.regions(utterance, speaker_index)
        if regions.shape[0]:
            break
    else:
        raise NanodrzError(f"speaker {bank.speakers[speaker_index].speaker!r} has no speech regions in the bank")
    first = int(rng.integers(regions.shape[0]))
    start = float(regions[first, 0])
    last = first
    while last + 1 < regions.shape[0] and regions[last + 1, 1] - start <= target:
        last += 1
    end = min(float(regions[last, 1]), start + cap)
    kept = np.array(regions[first:last + 1], dtype=np.float64) - start
    kept = kept[kept[:, 0] < end - start]
    kept[:, 1] = np.minimum(kept[:, 1], end - start)
    return utterance, start, end, kept


def _read_slice(bank: Bank, utterance: int, speaker_index: int, start: float, end: float) -> np.ndarray:
    """float32 samples of [start, end) seconds of an utterance as the speaker says it.

    Only the slice is read and perturbed, not the whole utterance.
    """
    perturbation = bank.speakers[speaker_index].perturbation
    raw = bank.raw_audio(utterance)
    first = int(round(start * perturbation.speed * SAMPLE_RATE))
    stop = min(int(round(end * perturbation.speed * SAMPLE_RATE)), raw.shape[0])
    audio = raw[first:stop].astype(np.float32)
    audio *= np.float32(1 / 32768)
    if not perturbation.is_identity():
        audio = apply_perturbation(audio, perturbation)
    return audio



@functools.lru_cache(maxsize=None)
def _fade_in(samples: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, samples))).astype(np.float32)


def _render_piece(bank: Bank, speaker_index: int, piece: _Piece, gain_db: float, reverb: acoustics.Reverb | None,
                  mix: np.ndarray, tracks: np.ndarray | None, label: str) -> list[Turn]:
    """Add one slice to the mix at its level (measured over its speech regions only) and return its turns."""
    audio = _read_slice(bank, piece.utterance, speaker_index, piece.source_start, piece.source_end)
    bounds = np.clip(np.round(piece.regions * SAMPLE_RATE).astype(np.int64), 0, audio.size)
    energy = sum(float(np.dot(audio[a:b], audio[a:b])) for a, b in bounds)
    count = int(np.sum(bounds[:, 1] - bounds[:, 0]))
    if count == 0 or energy / count < 1e-12:
        return []
    fade = _fade_in(min(int(FADE_SECONDS * SAMPLE_RATE), audio.size // 2))
    audio[: fade.size] *= fade
    audio[audio.size - fade.size:] *= fade[::-1]
    audio *= np.float32(10 ** (gain_db / 20) / math.sqrt(energy / count))
    if reverb is not None:
        audio = reverb.apply(audio)
    offset = int(round(piece.start * SAMPLE_RATE))
    stop = min(offset + audio.size, mix.size)
    if stop <= offset:
        return []
    mix[offset:stop] += audio[: stop - offset]
    if tracks is not None:
        tracks[piece.speaker, offset:stop] += audio[: stop - offset]
    turns = []
    for a, b in bounds:
        start, end = offset + int(a), min(offset + int(b), mix.size)
        if end > start:
            turns.append(Turn(start / SAMPLE_RATE, end / SAMPLE_RATE, label))
    return turns


def _choose_room(config: ReverbConfig, count: int,
                 rng: np.random.Generator) -> tuple[list[acoustics.Reverb] | None, dict | None]:
    """One room for the conversation and a distinct position in it for each speaker (or none)."""
    if rng.random() >= config.probability:
        return None, None
    rooms = acoustics.load_rir_bank(config.rooms)
    candidates = rooms.rooms_within(*config.rt60)
    room = int(candidates[rng.integers(candidates.size)])
    positions = (rng.permutation(acoustics.SOURCES_PER_ROOM)[:count] if count <= acoustics.SOURCES_PER_ROOM
                 else rng.integers(acoustics.SOURCES_PER_ROOM, size=count))
    return [rooms.reverb(room, int(p)) for p in positions], {"room": room, "rt60": round(float(rooms.rt60[room]), 3)}


def _add_noise(bank: Bank, config: NoiseConfig, mix: np.ndarray, speech_power: float,
               speech_samples: list[tuple[int, int]], rng: np.random.Generator) -> list[dict]:
    """Add background noises in place, each scaled to its SNR against the speech's mean power.

    The gain uses the noise's power over the whole conversation; the reported `measured_snr_db` is
    taken over the speech only, so it differs from the request for noises that come and go.
    """
    if rng.random() >= config.probability or speech_power <= 0:
        return []
    types = dict(config.types)
    directories = tuple(config.music_dirs)
    if types.get("music", 0) > 0 and not acoustics.available_music(directories):
        warnings.warn(f"no music files in {', '.join(directories) or '(no folders)'}: "
                      "music noise is replaced by the other noise types", stacklevel=3)
        types.pop("music")
        if sum(types.values()) <= 0:
            raise NanodrzError(
                f"noise.types allows only music, and there are no music files in {', '.join(directories)}"
            )
    low, high = as_range(config.sources)
    added = []
    for _ in range(int(rng.integers(low, high + 1))):
        kind = _weighted_choice(types, rng)
        snr = float(rng.uniform(*config.snr_db))
        if kind == "babble":
            buffer = _babble(bank, config.babble_voices)
        elif kind == "music":
            clips = acoustics.music_clips(directories)
            buffer = clips[int(rng.integers(len(clips)))]
        else:
            buffer = acoustics.coloured_noise(kind)
        noise = acoustics.loop_slice(buffer, int(rng.integers(buffer.size)), mix.size)
        noise_power = float(np.dot(noise, noise)) / max(noise.size, 1)
        if noise_power <= 0:
            continue
        gain = math.sqrt(speech_power / (noise_power * 10 ** (snr / 10)))
        if rng.random() < 0.5:
            gain = -gain
        mix += noise * np.float32(gain)
        during_speech = _power(noise, speech_samples) * gain**2
        added.append({
            "type": kind,
            "snr_db": round(snr, 2),
            "measured_snr_db": round(10 * math.log10(speech_power / during_speech), 2) if during_speech > 0 else None,
        })
    return added


_BABBLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _babble(bank: Bank, voices: int) -> np.ndarray:
    """A minute of `voices` bank speakers talking at once, unit RMS; made once per bank and size."""
    cached = _BABBLE.setdefault(bank, {})
    if voices not in cached:
        rng = np.random.default_rng(BABBLE_SEED)
        length = int(acoustics.NOISE_BUFFER_SECONDS * SAMPLE_RATE)
        babble = np.zeros(length, dtype=np.float32)
        for _ in range(voices):
            speaker = int(rng.integers(bank.num_speakers))
            utterances = bank.utterances_of(speaker)
            position = 0
            while position < length:
                audio = bank.audio(int(utterances[rng.integers(utterances.size)]), speaker)
                take = min(audio.size, length - position)
                babble[position:position + take] += normalize_level(audio, -20.0)[:take]
                position += max(take, SAMPLE_RATE)
        rms = math.sqrt(float(np.mean(np.square(babble, dtype=np.float64))))
        cached[voices] = babble / np.float32(rms) if rms > 0 else babble
    return cached[voices]


def _power(signal: np.ndarray, intervals: list[tuple[int, int]]) -> float:
    """Mean power of `signal` over sample intervals."""
    total = sum(float(np.dot(signal[a:b], signal[a:b])) for a, b in intervals)
    count = sum(min(b, signal.size) - a for a, b in intervals if a < signal.size)
    return total / count if count > 0 else 0.0


def _weighted_choice(weights: dict[str, float], rng: np.random.Generator) -> str:
    keys = list(weights)
    cumulative = np.cumsum([weights[k] for k in keys])
    return keys[min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(keys) - 1)]


def speech_activity(turns: list[Turn]) -> tuple[list[tuple[float, float]], float]:
    """The union of the turns as (start, end) intervals, and the seconds where two or more overlap."""
    events = sorted([(t.start, 1) for t in turns] + [(t.end, -1) for t in turns])
    union: list[tuple[float, float]] = []
    active, previous, opened, overlap = 0, 0.0, 0.0, 0.0
    for time, delta in events:
        if active >= 2:
            overlap += time - previous
        if active == 0:
            opened = time
        active += delta
        if active == 0 and time > opened:
            union.append((opened, time))
        previous = time
    return union, overlap


# --------------------------------------------------------------------------------------------------
# Finite sets and the endless training stream


def conversation_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of conversation `index` of a fixed set; `nanodrz simulate --seed` uses the same."""
    return np.random.default_rng([seed, index])


def fixed_conversations(bank: Bank, config: SimulationConfig, count: int, seed: int,
                        return_sources: bool = False) -> list[Conversation]:
    """The same `count` conversations for a given seed (e.g. a validation set)."""
    return [simulate_conversation(bank, config, conversation_rng(seed, i), return_sources) for i in range(count)]


@dataclass
class CurriculumStage:
    """From global sample `start` on, draw each conversation's preset with these weights."""

    start: int = 0
    presets: dict[str, float] = field(default_factory=lambda: {"clean": 1.0})
    overrides: list[str] = field(default_factory=list)  # key=value applied to every preset of the stage

    def __post_init__(self) -> None:
        if self.start < 0:
            raise NanodrzError(f"curriculum stage start = {self.start}: must be non-negative")
        _check_weights("curriculum stage presets", self.presets, tuple(self.presets))


@dataclass
class Curriculum:
    """A schedule of preset mixtures over training, by global sample index."""

    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])

    def __post_init__(self) -> None:
        starts = [stage.start for stage in self.stages]
        if not starts or starts[0] != 0:
            raise NanodrzError("curriculum: the first stage must start at sample 0")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise NanodrzError(f"curriculum: stage starts {starts} must increase")

    def resolve(self) -> list[tuple[int, list[tuple[str, SimulationConfig, float]]]]:
        """Each stage's start with its (preset name, config, weight) choices, presets loaded."""
        return [
            (stage.start, [(name, load_preset(name, stage.overrides), weight)
                           for name, weight in stage.presets.items()])
            for stage in self.stages
        ]


DATASET_STREAM = 1


class ConversationDataset(torch.utils.data.IterableDataset):
    """An endless stream of conversations mixed on the fly, for DataLoader workers and torchrun ranks.

    Conversation number g (global over ranks and workers: g = local * streams + stream) is drawn from
    the seed (seed, DATASET_STREAM, g), so no two workers or ranks ever produce the same sample and a
    run is reproducible for a fixed number of ranks and workers. The bank is opened inside each worker
    (memory maps do not survive pickling). `start` skips the first `start` global samples (resuming).
    Items are `Conversation`s, or whatever `transform` (picklable) makes of them in the worker.
    """

    def __init__(self, bank_root: str | Path, split: str = "train",
                 config: SimulationConfig | Curriculum | None = None, seed: int = 0, *,
                 rank: int | None = None, world_size: int | None = None, start: int = 0,
                 transform: Callable[[Conversation], Any] | None = None, return_sources: bool = False):
        super().__init__()
        if split not in SPLITS:
            raise NanodrzError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        config = SimulationConfig() if config is None else config
        if isinstance(config, Curriculum):
            self.stages = config.resolve()
        else:
            self.stages = [(0, [("config", config, 1.0)])]
        self.bank_root = Path(bank_root)
        self.split = split
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.transform = transform
        self.return_sources = return_sources

    def _rank_and_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _choose_config(self, index: int, rng: np.random.Generator) -> tuple[str, SimulationConfig]:
        choices = [choices for start, choices in self.stages if start <= index][-1]
        names = {name: weight for name, _, weight in choices}
        picked = _weighted_choice(names, rng)
        return picked, next(config for name, config, _ in choices if name == picked)

    def __iter__(self) -> Iterator[Any]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        rank, world = self._rank_and_world()
        stream, streams = rank * workers + worker_id, world * workers
        bank = Bank(self.bank_root, self.split)
        for _, choices in self.stages:
            for _, config, _ in choices:
                check_bank(bank, config)
        local = max(0, -(-(self.start - stream) // streams))
        while True:
            index = local * streams + stream
            rng = np.random.default_rng([self.seed, DATASET_STREAM, index])
            name, config = self._choose_config(index, rng)
            conversation = simulate_conversation(bank, config, rng, self.return_sources)
            conversation.meta["index"] = index
            conversation.meta["preset"] = name
            yield self.transform(conversation) if self.transform is not None else conversation
            local += 1


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="clean",
                        help=f"difficulty preset: {', '.join(preset_names())}, or a YAML file (default: clean)")
    parser.add_argument("--num", type=int, default=10, help="number of conversations (default: 10)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for <id>.wav, <id>.rttm, manifest.json")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--bank", type=Path, default=None, help="speech bank folder (default: <cache>/bank)")
    parser.add_argument("--split", default="test", help="bank split to draw speakers from (default: test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob, e.g. --set num_speakers=[2,4] (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise NanodrzError(f"--num {args.num}: must be at least 1")
    if args.seed < 0:
        raise NanodrzError(f"--seed {args.seed}: must be non-negative")
    config = load_preset(args.preset, args.overrides)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NanodrzError(f"--out {out}: exists and is not a folder")
    bank = Bank(args.bank if args.bank is not None else default_bank_dir(), args.split)
    check_bank(bank, config)
    stem = Path(args.preset).stem
    entries = []
    seconds = 0.0
    for index in tqdm(range(args.num), desc=f"simulating {stem}", unit="conversation"):
        conversation = simulate_conversation(bank, config, conversation_rng(args.seed, index))
        name = f"{stem}-{index:05d}"
        write_audio(out / f"{name}.wav", conversation.audio, conversation.sample_rate)
        write_rttm(out / f"{name}.rttm", {name: conversation.turns})
        entries.append({"id": name, "audio": f"{name}.wav", "rttm": f"{name}.rttm", **conversation.meta})
        seconds += conversation.duration
    write_json(out / "manifest.json", {
        "version": MANIFEST_VERSION,
        "preset": args.preset,
        "overrides": list(args.overrides),
        "seed": args.seed,
        "split": args.split,
        "bank": str(bank.root),
        "config": to_dict(config),
        "conversations": entries,
    })
    print(f"wrote {args.num} conversations ({seconds / 60:.1f} min of audio) to {out}")
    return 0
