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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nanodrz import acoustics, nonspeech
from nanodrz.annotation import Turn, sort_turns, write_rttm
from nanodrz.audio import SAMPLE_RATE, write_audio
from nanodrz.bank import Bank, apply_perturbation
from nanodrz.config import to_dict
from nanodrz.errors import NanodrzError
from nanodrz.fileio import write_json
from nanodrz.paths import default_bank_dir
from nanodrz.simulation_config import (NoiseConfig, ReverbConfig, SimulationConfig, as_range, load_preset,
                                       preset_names)
from nanodrz.turn_taking import Piece, Planner, choose_speakers

MANIFEST_VERSION = 1


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


def check_bank(bank: Bank, config: SimulationConfig) -> None:
    """The bank's split(s) must hold as many speakers as a conversation of `config` may need."""
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
    speakers = choose_speakers(bank, num_speakers, layout_rng) if num_speakers else []
    pieces = Planner(bank, speakers, duration_seconds, config.turns, layout_rng).plan() if speakers else []
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
        placed = _render_piece(bank, speakers[piece.speaker], piece, gain_db, reverb, config.slice_fade_seconds, mix,
                               tracks, labels[piece.speaker])
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
            functools.partial(bank.babble, config.nonspeech.babble_voices, acoustics.NOISE_BUFFER_SECONDS),
            int(nonspeech_rng.integers(low, high + 1)))
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


def _render_piece(bank: Bank, speaker_index: int, piece: Piece, gain_db: float, reverb: acoustics.Reverb | None,
                  fade_seconds: float, mix: np.ndarray, tracks: np.ndarray | None, label: str) -> list[Turn]:
    """Add one slice to the mix at its level (measured over its speech regions only) and return its turns."""
    audio = _read_slice(bank, piece.utterance, speaker_index, piece.source_start, piece.source_end)
    bounds = np.clip(np.round(piece.regions * SAMPLE_RATE).astype(np.int64), 0, audio.size)
    energy = sum(float(np.dot(audio[a:b], audio[a:b])) for a, b in bounds)
    count = int(np.sum(bounds[:, 1] - bounds[:, 0]))
    if count == 0 or energy / count < 1e-12:
        return []
    acoustics.fade_ends(audio, fade_seconds)
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
            buffer = bank.babble(config.babble_voices, acoustics.NOISE_BUFFER_SECONDS)
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
# Fixed sets


def conversation_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of conversation `index` of a fixed set; `nanodrz simulate --seed` uses the same."""
    return np.random.default_rng([seed, index])


def fixed_conversations(bank: Bank, config: SimulationConfig, count: int, seed: int,
                        return_sources: bool = False) -> list[Conversation]:
    """The same `count` conversations for a given seed (e.g. a validation set)."""
    return [simulate_conversation(bank, config, conversation_rng(seed, i), return_sources) for i in range(count)]


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
    parser.add_argument("--voices", choices=("all", "tts", "recorded"), default="all",
                        help="draw only synthetic voices, or only recorded ones as recorded (no pitch- or "
                             "tempo-shifted copies) (default: all)")
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
    bank = Bank(args.bank if args.bank is not None else default_bank_dir(), args.split,
                kind=None if args.voices == "all" else args.voices, perturbed=args.voices != "recorded")
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
        "voices": args.voices,
        "bank": str(bank.root),
        "config": to_dict(config),
        "conversations": entries,
    })
    print(f"wrote {args.num} conversations ({seconds / 60:.1f} min of audio) to {out}")
    return 0
