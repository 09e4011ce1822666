"""Conversations mixed per second by one CPU core: 20 s, 2-4 speakers, background noise and reverb on.

The conditions are the `noisy` preset with every conversation noisy (one noise: white, pink, brown,
babble or music) and reverberant (cached rooms, RT60 0.15-1.0 s). One process, pinned to one core. Uses the
prepared bank at the default location (or --bank) when there is one, else builds the synthetic test
bank (tests/conftest.py) in a temporary folder. The room bank is simulated once into the cache
before timing, like every other one-off cost (noise buffers, babble, music).

Reports wall-clock and CPU-time rates; on a shared machine the CPU-time rate is the per-core figure.

    .venv/bin/python benchmarks/simulate_speed.py [--bank DIR] [--split train] [--num 300] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nanodrz.bank import Bank
from nanodrz.paths import default_bank_dir
from nanodrz.simulate import conversation_rng, simulate_conversation
from nanodrz.simulation_config import load_preset

BENCHMARK_OVERRIDES = [
    "duration=20",
    "num_speakers=[2,4]",
    "noise.probability=1",
    "noise.sources=1",
    "reverb.probability=1",
    "reverb.rt60=[0.15,1.0]",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=None,
                        help="bank folder (default: the prepared bank, else a synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=300, help="conversations to time")
    parser.add_argument("--profile", action="store_true", help="also print where the time goes")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever threads the libraries start

    temporary = None
    bank_root = args.bank
    if bank_root is None and (default_bank_dir() / "shards").is_dir():
        bank_root = default_bank_dir()
    if bank_root is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_bank

        temporary = tempfile.TemporaryDirectory()
        bank_root = build_tiny_bank(Path(temporary.name) / "bank", utterances_per_speaker=12)
        print("bank: synthetic (tests/conftest.py build_tiny_bank)")
    else:
        print(f"bank: {bank_root}")
    bank = Bank(bank_root, args.split)
    config = load_preset("noisy", BENCHMARK_OVERRIDES)

    for index in range(30):  # one-off work: room bank, noise buffers, babble, music
        simulate_conversation(bank, config, conversation_rng(1, index))

    wall, cpu = time.perf_counter(), time.process_time()
    speakers, reverberant = [], 0
    for index in range(args.num):
        conversation = simulate_conversation(bank, config, conversation_rng(0, index))
        speakers.append(conversation.meta["num_speakers"])
        reverberant += conversation.meta["reverb"] is not None
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.num} conversations of 20 s, {np.mean(speakers):.2f} speakers on average, "
          f"{reverberant} reverberant, all noisy")
    print(f"wall clock: {args.num / wall:.1f} conversations/s ({1000 * wall / args.num:.2f} ms each)")
    print(f"CPU time:   {args.num / cpu:.1f} conversations per CPU-second ({1000 * cpu / args.num:.2f} ms each, "
          f"{20 * args.num / cpu:.0f}x real time)")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for index in range(min(args.num, 100)):
            simulate_conversation(bank, config, conversation_rng(2, index))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
