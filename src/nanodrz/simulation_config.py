"""What a simulated conversation is made of: every knob of the simulator, in typed configs, and the presets.

A preset (`src/nanodrz/presets/<name>.yaml`) sets a subset of `SimulationConfig`; `load_preset` fills in
the defaults and applies `key=value` overrides. Every value is range-checked when the config is made,
so a mistake is a one-line `ConfigError` before anything is simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nanodrz import acoustics, nonspeech
from nanodrz.config import (apply_overrides, check_positive, check_probability, check_range, check_weights, from_dict,
                            read_yaml)
from nanodrz.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
MIN_SECONDS_PER_SPEAKER = 1.0  # the shortest conversation that can hold a speaker: a check, not a knob


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
    same_speaker_gap_seconds: float = 0.15  # least silence between two slices of one speaker (no self-overlap)

    def __post_init__(self) -> None:
        check_probability("turns.speaker_change_probability", self.speaker_change_probability)
        check_probability("turns.interruption_probability", self.interruption_probability)
        check_positive("turns.dominance", self.dominance)
        check_positive("turns.turn_seconds", self.turn_seconds)
        check_positive("turns.max_turn_seconds", self.max_turn_seconds)
        for name in ("pause_seconds", "gap_seconds", "max_silence_seconds", "overlap_seconds",
                     "backchannels_per_minute", "same_speaker_gap_seconds"):
            check_positive(f"turns.{name}", getattr(self, name), allow_zero=True)
        if self.target_overlap_ratio is not None and not 0.0 <= self.target_overlap_ratio < 1.0:
            raise ConfigError(f"turns.target_overlap_ratio = {self.target_overlap_ratio}: must lie in [0, 1)")
        check_range("turns.backchannel_seconds", self.backchannel_seconds, low=0.05)
        check_range("turns.lead_silence_seconds", self.lead_silence_seconds, low=0.0)


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
        check_probability("noise.probability", self.probability)
        check_range("noise.sources", as_range(self.sources), low=1)
        check_weights("noise.types", self.types, acoustics.NOISE_TYPES)
        check_range("noise.snr_db", self.snr_db, low=-20.0, high=80.0)
        if self.babble_voices < 1:
            raise ConfigError(f"noise.babble_voices = {self.babble_voices}: must be at least 1")


@dataclass
class ReverbConfig:
    """Rooms: each speaker gets a position in one simulated room, its speech the RIR from there."""

    probability: float = 0.0
    rt60: tuple[float, float] = (0.2, 0.8)  # seconds; rooms are drawn among those within the range
    rooms: int = 64  # size of the room bank simulated once and cached under the cache directory

    def __post_init__(self) -> None:
        check_probability("reverb.probability", self.probability)
        check_range("reverb.rt60", self.rt60, low=0.0, high=3.0)
        if self.rooms < 1:
            raise ConfigError(f"reverb.rooms = {self.rooms}: must be at least 1")


@dataclass
class TelephoneConfig:
    """A narrow-band channel (8 kHz, 300-3400 Hz) with an optional codec, applied to the whole mix."""

    probability: float = 0.0
    codecs: dict[str, float] = field(default_factory=lambda: {"none": 1.0, "mulaw": 1.0, "gsm": 1.0})

    def __post_init__(self) -> None:
        check_probability("telephone.probability", self.probability)
        check_weights("telephone.codecs", self.codecs, acoustics.CODECS)


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
    fade_seconds: float = 0.01  # raised-cosine fade in and out of a sound that starts or stops mid-recording

    def __post_init__(self) -> None:
        check_probability("nonspeech.probability", self.probability)
        check_probability("nonspeech.gap_probability", self.gap_probability)
        check_probability("nonspeech.no_speech_probability", self.no_speech_probability)
        check_range("nonspeech.sounds", as_range(self.sounds), low=1, high=20)
        check_weights("nonspeech.types", self.types, nonspeech.KINDS)
        check_range("nonspeech.level_db", self.level_db, low=-60.0, high=20.0)
        check_range("nonspeech.babble_level_db", self.babble_level_db, low=-60.0, high=20.0)
        check_positive("nonspeech.min_gap_seconds", self.min_gap_seconds)
        check_range("nonspeech.burst_seconds", self.burst_seconds, low=0.05)
        check_positive("nonspeech.fade_seconds", self.fade_seconds, allow_zero=True)
        if self.babble_voices < 1:
            raise ConfigError(f"nonspeech.babble_voices = {self.babble_voices}: must be at least 1")


@dataclass
class SimulationConfig:
    """Every knob of the conversation simulator; presets in src/nanodrz/presets/*.yaml set subsets."""

    num_speakers: int | tuple[int, int] = (2, 3)  # fixed or [min, max]
    duration: float | tuple[float, float] = (15.0, 25.0)  # seconds, fixed or [min, max]
    level_dbfs: tuple[float, float] = (-30.0, -20.0)  # speech level of the conversation
    loudness_gap_db: tuple[float, float] = (0.0, 6.0)  # spread of per-speaker levels around it
    utterance_level_jitter_db: float = 1.0  # each slice's level varies by up to this much
    slice_fade_seconds: float = 0.01  # raised-cosine fade at both ends of each slice: a cut in speech does not click
    turns: TurnTakingConfig = field(default_factory=TurnTakingConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    telephone: TelephoneConfig = field(default_factory=TelephoneConfig)
    nonspeech: NonSpeechConfig = field(default_factory=NonSpeechConfig)

    def __post_init__(self) -> None:
        speakers = as_range(self.num_speakers)
        check_range("num_speakers", speakers, low=1)
        duration = as_range(self.duration)
        check_range("duration", duration)
        if duration[0] <= 0:
            raise ConfigError(f"duration {list(duration)}: must be positive")
        if speakers[1] * MIN_SECONDS_PER_SPEAKER > duration[0]:
            raise ConfigError(
                f"{speakers[1]} speakers cannot all speak in {duration[0]:g} s "
                f"(allow {MIN_SECONDS_PER_SPEAKER:g} s per speaker: raise duration or lower num_speakers)"
            )
        check_range("level_dbfs", self.level_dbfs, low=-60.0, high=0.0)
        check_range("loudness_gap_db", self.loudness_gap_db, low=0.0)
        check_positive("utterance_level_jitter_db", self.utterance_level_jitter_db, allow_zero=True)
        check_positive("slice_fade_seconds", self.slice_fade_seconds, allow_zero=True)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> SimulationConfig:
    """A named preset (or a YAML file with the same keys) with `key=value` overrides applied."""
    path = Path(name)
    if not (name.endswith((".yaml", ".yml")) and path.is_file()):
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(preset_names())} or a YAML file)")
    data = apply_overrides(read_yaml(path), list(overrides))
    return from_dict(SimulationConfig, data, f"preset {name}")
