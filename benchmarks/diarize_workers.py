"""Files per minute of `nanodrz diarize --workers N` against `--workers 1`, on the same files.

The files (default 8 of 30-60 s) are conversations simulated with the `overlap` preset from the test
voices (the prepared bank, else the synthetic test bank), written as 16 kHz WAV files to a temporary
folder. Each worker count runs the whole command in a fresh process, timed from start to exit (start-up,
model loading and writing included: what a user waits for), with `--threads 1` per worker and the same
`--batch-size` (default 1, so that every worker has files to take). The frozen encoders run on the
command's default threads (the cores shared among the workers: both cores for `--workers 1`, one each for
`--workers 2`) unless `--encoder-threads` fixes them for every run. The RTTMs of every run must be
byte-identical to those of `--workers 1`; the script stops if they are not.

Start-up (importing torch, then spawning workers that import it again and load their model) is a fixed
cost of a few seconds that an archive of thousands of files never notices but 8 files do, so each worker
count is also timed on 1 s files (a group for every worker), and the files per minute after start-up
(wall time minus that) are reported next to the end-to-end ones.

    .venv/bin/python benchmarks/diarize_workers.py [--model PATH] [--files 8] [--seconds 30,60]
                                                   [--workers 1,2] [--batch-size 1] [--encoder-threads N]
                                                   [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diarize_speed import test_voices
from nanodrz.audio import write_audio
from nanodrz.pipeline import SHIPPED_MODEL
from nanodrz.simulate import conversation_rng, simulate_conversation
from nanodrz.simulation_config import load_preset


def write_conversations(folder: Path, count: int, seconds: tuple[float, float]) -> tuple[float, str]:
    """`count` simulated conversations as folder/NNN.wav; their total length and where the voices come from."""
    folder.mkdir(parents=True)
    total = 0.0
    with test_voices(None) as (bank, origin):
        speakers = min(4, bank.num_speakers)
        config = load_preset("overlap", [f"duration=[{seconds[0]},{seconds[1]}]", f"num_speakers=[2,{speakers}]"])
        for index in range(count):
            audio = simulate_conversation(bank, config, conversation_rng(0, index)).audio
            write_audio(folder / f"{index:03d}.wav", audio)
            total += len(audio) / 16000
    return total, origin


def timed_run(inputs: Path, out: Path, model: Path, workers: int, batch_size: int,
              encoder_threads: int | None) -> float:
    """Wall-clock seconds of one `nanodrz diarize` call."""
    started = time.perf_counter()
    threads = ["--encoder-threads", str(encoder_threads)] if encoder_threads else []
    done = subprocess.run([sys.executable, "-m", "nanodrz.cli", "diarize", str(inputs), "--out", str(out),
                           "--model", str(model), "--workers", str(workers), "--threads", "1",
                           "--batch-size", str(batch_size), *threads], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"diarize_workers: --workers {workers} failed:\n{done.stderr.strip()}")
    return seconds


def startup_seconds(folder: Path, model: Path, workers: int, batch_size: int, encoder_threads: int | None) -> float:
    """Wall-clock seconds of the same call on 1 s files, enough for every worker to start and load its
    model: start-up, next to no work."""
    for index in range(workers * batch_size):
        write_audio(folder / "in" / f"{index:03d}.wav", np.zeros(16000, dtype=np.float32))
    return timed_run(folder / "in", folder / "out", model, workers, batch_size, encoder_threads)


def rttms(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.rttm"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="checkpoint (default: the shipped model)")
    parser.add_argument("--files", type=int, default=8, help="conversations to diarize (default 8)")
    parser.add_argument("--seconds", default="30,60", help="shortest,longest conversation in seconds (default 30,60)")
    parser.add_argument("--workers", default="1,2", help="worker counts to time, the first is the reference")
    parser.add_argument("--batch-size", type=int, default=1, help="--batch-size of every run (default 1)")
    parser.add_argument("--encoder-threads", type=int, help="--encoder-threads of every run (default: the "
                        "command's own, the cores shared among the workers)")
    parser.add_argument("--json", type=Path, default=Path("diarize_workers.json"), help="where to write the results")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"diarize_workers: no model at {args.model}; pass --model PATH to a trained checkpoint")
    try:
        shortest, longest = (float(value) for value in args.seconds.split(","))
        counts = [int(value) for value in args.workers.split(",")]
    except ValueError:
        sys.exit("diarize_workers: --seconds takes two numbers and --workers whole numbers, comma-separated")
    if args.files < 1 or not 0 < shortest <= longest or min(counts) < 1 or (args.encoder_threads or 1) < 1:
        sys.exit("diarize_workers: --files, --seconds, --workers and --encoder-threads must be positive "
                 "(shortest <= longest)")

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        inputs = Path(temporary) / "in"
        audio_seconds, origin = write_conversations(inputs, args.files, (shortest, longest))
        print(f"{args.files} files, {audio_seconds:.0f} s of audio; voices: {origin}; model: {args.model}")
        reference = None
        for workers in counts:
            out = Path(temporary) / f"out{workers}"
            wall = timed_run(inputs, out, args.model, workers, args.batch_size, args.encoder_threads)
            written = rttms(out)
            reference = written if reference is None else reference
            if written != reference:
                sys.exit(f"diarize_workers: --workers {workers} wrote different RTTMs from --workers {counts[0]}")
            startup = startup_seconds(Path(temporary) / f"startup{workers}", args.model, workers, args.batch_size,
                                      args.encoder_threads)
            rows.append({"workers": workers, "wall_seconds": wall, "startup_seconds": startup,
                         "files_per_minute": args.files / wall * 60,
                         "files_per_minute_after_startup": args.files / max(wall - startup, 1e-9) * 60})
            print(f"--workers {workers}: {wall:.1f} s ({startup:.1f} s of start-up), "
                  f"{rows[-1]['files_per_minute']:.2f} files/min, "
                  f"{rows[-1]['files_per_minute_after_startup']:.2f} after start-up", flush=True)
    for key in ("files_per_minute", "files_per_minute_after_startup"):
        for row in rows:
            row[f"{key}_vs_first"] = row[key] / rows[0][key]
        print("{} relative to --workers {}: {}".format(key.replace("_", " "), counts[0], ", ".join(
            f"{row['workers']} workers x{row[key + '_vs_first']:.2f}" for row in rows)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model), "files": args.files, "audio_seconds": audio_seconds,
                                     "batch_size": args.batch_size, "encoder_threads": args.encoder_threads,
                                     "voices": origin, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
