"""The sets `nanodrz sweep` scores: simulated sets, planned from a preset and written to disk (or found
there unchanged), and folders of annotated recordings.

A simulated set is reused when its fingerprint (configuration, seed, size, bank) matches the one its
manifest.json was written with; the manifest is written last, so a killed run leaves no set that
looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import soundfile as sf
from tqdm import tqdm

from nanodrz.annotation import Turn, read_rttm, write_rttm
from nanodrz.audio import write_audio
from nanodrz.bank import Bank
from nanodrz.config import to_dict
from nanodrz.diarize import find_audio
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import load_turns
from nanodrz.fileio import write_json
from nanodrz.simulate import conversation_rng, simulate_conversation
from nanodrz.simulation_config import SimulationConfig, as_range, load_preset

SET_VERSION = 1
# Sets of longer conversations get fewer files, so that a point holds about per-point x 25 s of audio.
SECONDS_PER_FILE = 25.0
MIN_LONG_FORM_FILES = 2


@dataclass
class TestSet:
    """Recordings with reference turns: one row of a table."""

    group: str
    name: str
    recordings: list[tuple[str, Path]]  # (file id, audio path)
    references: dict[str, list[Turn]]
    overrides: tuple[str, ...] = ()
    fingerprint: str | None = None  # simulated sets with equal fingerprints hold the same files
    note: str = ""
    conversations: list[dict] = field(default_factory=list)  # simulator records (manifest entries)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class PlannedSet:
    """A simulated set still to be written or found on disk."""

    group: str
    name: str
    preset: str
    overrides: tuple[str, ...]  # all of them, as given to `load_preset`
    point_overrides: tuple[str, ...]  # those that make this point of an axis
    config: SimulationConfig
    count: int


def plan_set(group: str, name: str, preset: str, overrides: tuple[str, ...], point_overrides: tuple[str, ...],
             per_point: int) -> PlannedSet:
    config = load_preset(preset, list(overrides))
    return PlannedSet(group, name, preset, overrides, point_overrides, config, file_count(config, per_point))


def file_count(config: SimulationConfig, per_point: int) -> int:
    """`per_point`, or fewer files for long recordings so a set holds about per_point x 25 s of audio."""
    mean_seconds = sum(as_range(config.duration)) / 2
    if mean_seconds <= SECONDS_PER_FILE:
        return per_point
    return min(per_point, max(MIN_LONG_FORM_FILES, math.ceil(per_point * SECONDS_PER_FILE / mean_seconds)))


def set_fingerprint(plan: PlannedSet, bank: Bank, seed: int) -> str:
    """What decides a simulated set's bytes: configuration, seed, size, bank folder, split and speakers."""
    identity = {
        "version": SET_VERSION,
        "config": to_dict(plan.config),
        "seed": seed,
        "count": plan.count,
        "bank": str(bank.root.resolve()),
        "splits": list(bank.splits),
        "speakers": [speaker.speaker for speaker in bank.speakers],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def materialize(plan: PlannedSet, directory: Path, bank: Bank, seed: int) -> TestSet:
    """Write the set's audio, RTTMs and manifest (manifest last), or reuse them if already there."""
    fingerprint = set_fingerprint(plan, bank, seed)
    manifest_path = directory / "manifest.json"
    names = [f"{index:05d}" for index in range(plan.count)]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    entries = manifest.get("conversations", [])
    reusable = manifest.get("fingerprint") == fingerprint and all(
        (directory / f"{name}.{ext}").is_file() for name in names for ext in ("wav", "rttm"))
    if not reusable:
        for stale in [*directory.glob("*.wav"), *directory.glob("*.rttm")]:
            if stale.stem not in names:
                stale.unlink()
        entries = []
        for index, name in enumerate(tqdm(names, desc=f"simulating {plan.group}/{plan.name}", unit="file",
                                          leave=False, file=sys.stderr)):
            conversation = simulate_conversation(bank, plan.config, conversation_rng(seed, index))
            write_audio(directory / f"{name}.wav", conversation.audio, conversation.sample_rate)
            write_rttm(directory / f"{name}.rttm", {name: conversation.turns})
            entries.append({"id": name, "audio": f"{name}.wav", "rttm": f"{name}.rttm", **conversation.meta})
        write_json(manifest_path, {
            "version": SET_VERSION,
            "fingerprint": fingerprint,
            "preset": plan.preset,
            "overrides": list(plan.overrides),
            "config": to_dict(plan.config),
            "seed": seed,
            "split": ",".join(bank.splits),
            "bank": str(bank.root),
            "conversations": entries,
        })
    references = {}
    for name in names:
        references[name] = read_rttm(directory / f"{name}.rttm").get(name, [])
    return TestSet(plan.group, plan.name, [(name, directory / f"{name}.wav") for name in names], references,
                   plan.point_overrides, fingerprint, conversations=entries)


def annotated_set(spec: str) -> TestSet:
    """`AUDIO_DIR[:RTTM_DIR]`: the audio files of a folder whose stems have reference turns in RTTM_DIR."""
    audio_part, _, rttm_part = spec.partition(":")
    audio_dir = Path(audio_part)
    rttm_dir = Path(rttm_part) if rttm_part else audio_dir
    if not audio_dir.is_dir():
        raise NanodrzError(f"--extra {spec}: {audio_dir} is not a folder")
    references = load_turns(rttm_dir, "reference")
    files, _ = find_audio([str(audio_dir)])
    recordings = [(path.stem, path) for _, path in files if path.stem in references]
    if not recordings:
        raise NanodrzError(f"--extra {spec}: no audio file in {audio_dir} has a reference in {rttm_dir} "
                           "(file stems must match RTTM file ids)")
    skipped = len(files) - len(recordings)
    note = f"{skipped} audio file(s) without reference skipped" if skipped else ""
    return TestSet("sets", audio_dir.resolve().name, recordings, {uri: references[uri] for uri, _ in recordings},
                   note=note)


def audio_seconds(recordings: Sequence[tuple[str, Path]]) -> float:
    return sum(sf.info(str(path)).duration for _, path in recordings)
