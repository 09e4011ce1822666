"""Sounds that are not speech, for the simulator: they go into the audio and never into the reference.

Real recordings are full of sounds that are not speech: music, beeps, typing, hum, clicks, room tone.
A model that has only heard speech writes a speaker for every one of them. Each kind below is made
at a given length from a numpy Generator (the same generator state gives the same samples):

    music     recorded music (Asterisk's music on hold, CC-BY-SA)
    effects   recorded sound effects (the freedesktop.org sound theme, minus its spoken channel names)
    noise     white, pink or brown noise
    hum       mains hum: 50 or 60 Hz and some of its harmonics
    dc        a DC offset, as from a bad sound card
    clicks    sparse clicks and pops
    keyboard  typing: key presses and releases through one resonance, in bursts
    tone      one or two steady sine tones (dial tones, beeps, whistles)
    square    a square wave (buzzers, interference)
    room      room tone: low-passed pink noise (ventilation, far traffic)
    babble    many bank voices at once, from the conversation's own split (made by the simulator)

A sound's level is its `active_level_db`: the RMS over the 20 ms frames in which it sounds (within
30 dB of its loudest frame), so a few clicks and a steady hum at the same level sound equally loud
when they sound. `add_sounds` places sounds in the silent stretches between turns or under the whole
recording; the simulator's `NonSpeechConfig` holds its knobs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

from nanodrz import acoustics
from nanodrz.audio import SAMPLE_RATE
from nanodrz.errors import NanodrzError

if TYPE_CHECKING:
    from nanodrz.simulation_config import NonSpeechConfig

RECORDED_KINDS = ("music", "effects")
SYNTHESISED_KINDS = ("noise", "hum", "dc", "clicks", "keyboard", "tone", "square", "room")
KINDS = (*RECORDED_KINDS, *SYNTHESISED_KINDS, "babble")
LEVEL_FRAME_SECONDS = 0.02
LEVEL_FLOOR_DB = 30.0  # frames this far below the loudest one do not count towards the level


def active_level_db(signal: np.ndarray) -> float:
    """RMS level (dB re full scale 1.0) over the 20 ms frames within 30 dB of the loudest; -inf if silent."""
    frame = int(LEVEL_FRAME_SECONDS * SAMPLE_RATE)
    count = max(signal.size // frame, 1)
    frames = np.zeros(count * frame, dtype=np.float64)
    frames[: min(signal.size, frames.size)] = signal[: frames.size]
    powers = np.mean(np.square(frames.reshape(count, frame)), axis=1)
    loudest = float(np.max(powers))
    if loudest <= 0:
        return -math.inf
    active = powers[powers >= loudest * 10 ** (-LEVEL_FLOOR_DB / 10)]
    return 10 * math.log10(float(np.mean(active)))


def at_level(signal: np.ndarray, level_db: float) -> np.ndarray:
    """`signal` scaled so that its active level is `level_db` (float32)."""
    current = active_level_db(signal)
    if not math.isfinite(current):
        return signal.astype(np.float32)
    return (signal * 10 ** ((level_db - current) / 20)).astype(np.float32)


def recorded_clips(kind: str, config: NonSpeechConfig) -> tuple[np.ndarray, ...]:
    """Music or sound-effect clips (unit RMS, 16 kHz) from the configured folders."""
    if kind == "music":
        return acoustics.music_clips(tuple(config.music_dirs))
    return acoustics.sound_clips(tuple(config.effect_dirs), tuple(config.effect_exclude), min_seconds=0.05)


def available_kinds(config: NonSpeechConfig) -> dict[str, float]:
    """The configured kind weights, without recorded kinds whose folders hold no usable file."""
    return {kind: weight for kind, weight in config.types.items()
            if weight > 0 and (kind not in RECORDED_KINDS or recorded_clips(kind, config))}


def synthesise(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of a synthesised kind (float32, not yet at any level)."""
    time = np.arange(length) / SAMPLE_RATE
    if kind == "noise":
        buffer = acoustics.coloured_noise(acoustics.COLOURED_NOISES[int(rng.integers(3))])
        return acoustics.loop_slice(buffer, int(rng.integers(buffer.size)), length).copy()
    if kind == "hum":
        base = (50.0, 60.0)[int(rng.integers(2))]
        signal = np.zeros(length)
        for harmonic in range(1, int(rng.integers(1, 9)) + 1):
            amplitude = rng.uniform(0.2, 1.0) / harmonic ** rng.uniform(0.0, 1.5)
            signal += amplitude * np.sin(2 * np.pi * base * harmonic * time + rng.uniform(0, 2 * np.pi))
        return signal.astype(np.float32)
    if kind == "dc":
        return np.full(length, (-1.0, 1.0)[int(rng.integers(2))], dtype=np.float32)
    if kind == "clicks":
        return _clicks(length, rng)
    if kind == "keyboard":
        return _keyboard(length, rng)
    if kind == "tone":
        frequencies = np.exp(rng.uniform(math.log(150.0), math.log(3000.0), size=int(rng.integers(1, 3))))
        return sum(np.sin(2 * np.pi * f * time + rng.uniform(0, 2 * np.pi)) for f in frequencies).astype(np.float32)
    if kind == "square":
        frequency = math.exp(rng.uniform(math.log(50.0), math.log(1500.0)))
        return np.sign(np.sin(2 * np.pi * frequency * time + rng.uniform(0, 2 * np.pi))).astype(np.float32)
    if kind == "room":
        buffer = acoustics.coloured_noise("pink")
        pink = acoustics.loop_slice(buffer, int(rng.integers(buffer.size)), length)
        cutoff = math.exp(rng.uniform(math.log(100.0), math.log(1000.0)))
        return sosfilt(butter(2, cutoff, fs=SAMPLE_RATE, output="sos"), pink).astype(np.float32)
    raise ValueError(f"unknown synthesised kind {kind!r}")


def _clicks(length: int, rng: np.random.Generator) -> np.ndarray:
    """Clicks and pops (1-5 ms decaying pulses of either sign) at 0.5-8 a second, at least one."""
    signal = np.zeros(length, dtype=np.float32)
    count = max(1, int(rng.poisson(rng.uniform(0.5, 8.0) * length / SAMPLE_RATE)))
    for at in rng.integers(length, size=count):
        pulse_length = int(rng.uniform(0.001, 0.005) * SAMPLE_RATE)
        pulse = np.exp(-np.arange(pulse_length) / (0.25 * pulse_length)) * rng.uniform(0.3, 1.0)
        pulse *= (-1.0, 1.0)[int(rng.integers(2))]
        stop = min(at + pulse_length, length)
        signal[at:stop] += pulse[: stop - at]
    return signal


def _keyboard(length: int, rng: np.random.Generator) -> np.ndarray:
    """Typing: 3-8 keys a second in bursts, each a press and a softer release 50-150 ms later, through
    one band-pass resonance (the keyboard's own sound)."""
    excitation = np.zeros(length)
    rate = rng.uniform(3.0, 8.0)
    at = float(rng.uniform(0.0, 0.5))
    while True:
        at += float(rng.exponential(1 / rate)) + (float(rng.uniform(0.5, 2.0)) if rng.random() < 0.1 else 0.0)
        press = int(at * SAMPLE_RATE)
        if press >= length:
            break
        strength = rng.uniform(0.4, 1.0)
        release = press + int(rng.uniform(0.05, 0.15) * SAMPLE_RATE)
        for start, gain in ((press, strength), (release, 0.4 * strength)):
            burst = int(rng.uniform(0.004, 0.012) * SAMPLE_RATE)
            stop = min(start + burst, length)
            if stop > start:
                decay = np.exp(-np.arange(stop - start) / (0.3 * burst))
                excitation[start:stop] += gain * decay * rng.standard_normal(stop - start)
    centre = math.exp(rng.uniform(math.log(800.0), math.log(4000.0)))
    band = butter(2, [centre / 1.5, min(centre * 1.5, 0.45 * SAMPLE_RATE)], btype="bandpass", fs=SAMPLE_RATE)
    return lfilter(*band, excitation).astype(np.float32)


def silent_stretches(speech: list[tuple[float, float]], duration: float,
                     min_seconds: float) -> list[tuple[float, float]]:
    """The stretches of [0, duration] outside `speech` (sorted, disjoint intervals) at least `min_seconds` long."""
    stretches, cursor = [], 0.0
    for start, end in [*speech, (duration, duration)]:
        if start - cursor >= min_seconds:
            stretches.append((cursor, start))
        cursor = max(cursor, end)
    return stretches


def add_sounds(mix: np.ndarray, config: NonSpeechConfig, speech: list[tuple[float, float]], speech_level_db: float,
               rng: np.random.Generator, babble: Callable[[], np.ndarray], count: int) -> list[dict]:
    """Add `count` non-speech sounds to `mix` in place; what was added, for the manifest.

    Each sound fills part of a silent stretch between turns (chance `gap_probability`, when there is a
    stretch of at least `min_gap_seconds`; it never touches speech then) or runs under the whole
    recording (a sound effect: once, anywhere). Its active level is the speech level plus `level_db`
    (`babble_level_db` for babble). With no speech, the whole recording is one silent stretch.
    """
    weights = available_kinds(config)
    if not weights:
        folders = ", ".join([*config.music_dirs, *config.effect_dirs]) or "(no folders)"
        raise NanodrzError(f"nonspeech.types allows only recorded sounds, and there are none in {folders}")
    kinds = list(weights)
    probabilities = np.asarray([weights[kind] for kind in kinds]) / sum(weights.values())
    duration = mix.size / SAMPLE_RATE
    stretches = silent_stretches(speech, duration, config.min_gap_seconds)
    added = []
    for _ in range(count):
        kind = kinds[int(rng.choice(len(kinds), p=probabilities))]
        clip = None
        if kind in RECORDED_KINDS:
            clips = recorded_clips(kind, config)
            clip = clips[int(rng.integers(len(clips)))]
        if stretches and rng.random() < config.gap_probability:
            low, high = stretches[int(rng.integers(len(stretches)))]
            wanted = clip.size / SAMPLE_RATE if kind == "effects" else float(rng.uniform(*config.burst_seconds))
            seconds = min(wanted, high - low)
            start = low + float(rng.uniform(0.0, high - low - seconds))
            placement = "between turns"
        elif kind == "effects":
            seconds = min(clip.size / SAMPLE_RATE, duration)
            start = float(rng.uniform(0.0, duration - seconds))
            placement = "anywhere"
        else:
            start, seconds = 0.0, duration
            placement = "under everything"
        first = int(round(start * SAMPLE_RATE))
        length = min(int(round(seconds * SAMPLE_RATE)), mix.size - first)
        if length <= 0:
            continue
        if kind == "babble":
            buffer = babble()
            signal = acoustics.loop_slice(buffer, int(rng.integers(buffer.size)), length).copy()
            level = speech_level_db + float(rng.uniform(*config.babble_level_db))
        else:
            if clip is None:
                signal = synthesise(kind, length, rng)
            elif kind == "music":
                signal = acoustics.loop_slice(clip, int(rng.integers(clip.size)), length).copy()
            else:
                signal = clip[:length].copy()
            level = speech_level_db + float(rng.uniform(*config.level_db))
        if placement != "under everything":
            signal = acoustics.fade_ends(signal, config.fade_seconds)
        signal = at_level(signal, level)
        mix[first:first + length] += signal
        added.append({"type": kind, "placement": placement, "start": round(first / SAMPLE_RATE, 3),
                      "end": round((first + length) / SAMPLE_RATE, 3), "level_dbfs": round(level, 2)})
    return added
