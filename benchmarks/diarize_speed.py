"""Diarization speed on CPU: real-time factor, seconds per audio minute and peak memory by recording length.

The recordings (default 1, 10 and 60 minutes) are one simulated meeting (the `long` preset at 5 minutes,
from the test split of the prepared bank when there is one, else of the synthetic test bank) looped to
each length and written as 16 kHz WAV files to a temporary folder. Each length is diarized in its own
process pinned to `--cores` cores with as many torch threads, so its peak memory (ru_maxrss) is its
own: the process loads the model, diarizes a 10 s warm-up clip, then the whole file, timed. Cost that
grows faster than the length shows up as rising seconds per audio minute.

    .venv/bin/python benchmarks/diarize_speed.py [--model PATH] [--lengths 1,10,60] [--cores 2] [--threads N]
                                                 [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.pipeline import SHIPPED_MODEL
from nanodrz.paths import default_bank_dir
from nanodrz.simulate import conversation_rng, load_preset, simulate_conversation

MEETING_SECONDS = 300
WARM_UP_SECONDS = 10.0


def pin(cores: int, threads: int) -> None:
    """Run on `cores` cores (the first ones this process may use) with `threads` torch threads."""
    import torch

    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(model: Path, audio: Path, cores: int, threads: int) -> dict:
    """Run in the child process: load, warm up, diarize `audio` once, timed."""
    pin(cores, threads)
    from nanodrz.pipeline import Diarizer

    started = time.perf_counter()
    diarizer = Diarizer.from_pretrained(model)
    load_seconds = time.perf_counter() - started
    warm_up = sf.read(str(audio), frames=int(WARM_UP_SECONDS * SAMPLE_RATE), dtype="float32")[0]
    diarizer(warm_up)
    rss_before = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    annotation = diarizer(audio)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seconds = sf.info(str(audio)).duration
    return {
        "audio_seconds": seconds,
        "chunks": int(np.ceil(seconds / diarizer.geometry.chunk_seconds)),
        "chunk_seconds": diarizer.geometry.chunk_seconds,
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "real_time_factor": wall / seconds,
        "seconds_per_audio_minute": wall / (seconds / 60),
        "peak_rss_mb_before": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "speakers": len(annotation.labels()),
        "turns": len(annotation),
    }


@contextlib.contextmanager
def test_voices() -> Iterator[tuple[Bank, str]]:
    """The test split of the prepared bank if there is one, else of the synthetic test bank (built in a
    temporary folder for as long as it is used), and where its voices come from."""
    if (default_bank_dir() / "shards").is_dir():
        yield Bank(default_bank_dir(), "test"), f"bank {default_bank_dir()}"
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_bank

    with tempfile.TemporaryDirectory() as temporary:
        yield Bank(build_tiny_bank(Path(temporary) / "bank"), "test"), "synthetic test bank (tests/conftest.py)"


def meeting_audio() -> tuple[np.ndarray, str]:
    """A 5 minute simulated meeting and where its voices come from."""
    with test_voices() as (bank, origin):
        speakers = min(5, bank.num_speakers)
        # No rooms: reverberation does not change the cost, and the room bank would be simulated first.
        config = load_preset("long", [f"duration={MEETING_SECONDS}", f"num_speakers=[2,{speakers}]",
                                      "reverb.probability=0"])
        return simulate_conversation(bank, config, conversation_rng(0, 0)).audio, origin


def write_looped(path: Path, meeting: np.ndarray, minutes: float) -> None:
    """`minutes` of the meeting played over and over, written block by block."""
    remaining = int(minutes * 60 * SAMPLE_RATE)
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, "PCM_16") as handle:
        while remaining > 0:
            block = meeting[:remaining]
            handle.write(block)
            remaining -= len(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--lengths", default="1,10,60", help="recording lengths in minutes (default: 1,10,60)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores and torch threads (default: 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: as many as cores)")
    parser.add_argument("--json", type=Path, default=Path("diarize_speed.json"), help="where to write the results")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model if args.model is not None else SHIPPED_MODEL
    threads = args.threads or args.cores
    if not model.is_file():
        sys.exit(f"diarize_speed: no model at {model}; pass --model PATH to a trained checkpoint")
    if args.child is not None:
        print(json.dumps(measure(model, args.child, args.cores, threads)))
        return
    try:
        lengths = [float(value) for value in args.lengths.split(",") if value.strip()]
    except ValueError:
        sys.exit(f"diarize_speed: --lengths {args.lengths!r} must be comma-separated minutes")
    if not lengths or min(lengths) <= 0:
        sys.exit("diarize_speed: --lengths needs positive minutes")

    meeting, origin = meeting_audio()
    print(f"voices: {origin}; model: {model}; {args.cores} core(s), {threads} torch thread(s)")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for minutes in lengths:
            path = Path(folder) / f"{minutes:g}min.wav"
            write_looped(path, meeting, minutes)
            child = subprocess.run([sys.executable, __file__, "--child", str(path), "--model", str(model),
                                    "--cores", str(args.cores), "--threads", str(threads)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"diarize_speed: the {minutes:g} min run failed:\n{child.stderr.strip()}")
            rows.append({"minutes": minutes, **json.loads(child.stdout.strip().splitlines()[-1])})
            path.unlink()
            print_table(rows[-1:], header=len(rows) == 1)
    first = rows[0]["seconds_per_audio_minute"]
    for row in rows:
        row["cost_per_minute_vs_first"] = row["seconds_per_audio_minute"] / first
    print("seconds per audio minute relative to the first length: "
          + ", ".join(f"{row['minutes']:g} min x{row['cost_per_minute_vs_first']:.2f}" for row in rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(model), "cores": args.cores, "threads": threads, "voices": origin,
                                     "meeting_seconds": MEETING_SECONDS, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


def print_table(rows: list[dict], header: bool) -> None:
    if header:
        print(f"{'minutes':>7} {'chunks':>6} {'wall s':>8} {'RTF':>7} {'s/audio min':>11} {'CPU s':>8} "
              f"{'peak MB':>8} {'MB before':>9} {'speakers':>8}")
    for row in rows:
        print(f"{row['minutes']:>7g} {row['chunks']:>6d} {row['wall_seconds']:>8.1f} {row['real_time_factor']:>7.4f} "
              f"{row['seconds_per_audio_minute']:>11.2f} {row['cpu_seconds']:>8.1f} {row['peak_rss_mb']:>8.0f} "
              f"{row['peak_rss_mb_before']:>9.0f} {row['speakers']:>8d}", flush=True)


if __name__ == "__main__":
    main()
