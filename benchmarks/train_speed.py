"""Training throughput of a config on this machine: samples/s and hours of audio per second.

Measures three things separately, because on a small machine they compete for the same cores:
  data   simulating and collating batches (one process, as one DataLoader worker does),
  model  forward + backward + AdamW step on batches prepared beforehand,
  loop   the real loop: DataLoader workers feeding the model, as `nanodrz train` runs it.

    .venv/bin/python benchmarks/train_speed.py configs/small.yaml [--set key=value ...] [--steps 20]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch.utils.data import DataLoader

from nanodrz.audio import SAMPLE_RATE
from nanodrz.config import load_config
from nanodrz.features import bf16_is_fast
from nanodrz.model import DiarizationModel, sequence_loss
from nanodrz.tokenizer import Tokenizer
from nanodrz.train import parameter_groups, setup_distributed, training_stream
from nanodrz.training_config import Config


def audio_hours(batches: list[dict]) -> float:
    return sum(float(b["audio_lengths"].sum()) for b in batches) / SAMPLE_RATE / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    config = load_config(Config, args.config, args.set)
    env = setup_distributed(config.train.device)
    tokenizer = Tokenizer(config.tokenizer)
    stream = training_stream(config, tokenizer)
    total = args.warmup + args.steps

    start = time.perf_counter()
    batches = list(itertools.islice(iter(stream), total))
    data_seconds = time.perf_counter() - start

    torch.manual_seed(0)
    model = DiarizationModel(config.model, tokenizer).to(env.device)
    net = torch.compile(model) if config.train.compile else model
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim), lr=config.optim.lr)
    use_bf16 = config.train.bf16 and bf16_is_fast(env.device)

    def step(batch: dict) -> None:
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
            loss = sequence_loss(logits, batch["tokens"], batch["weights"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()

    for batch in batches[:args.warmup]:
        step(batch)
    synchronize()
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    synchronize()
    model_seconds = time.perf_counter() - start

    loader = DataLoader(stream, batch_size=None, num_workers=config.data.workers,
                        prefetch_factor=2 if config.data.workers else None)
    iterator = iter(loader)
    for _ in range(args.warmup):
        step(next(iterator))
    synchronize()
    start = time.perf_counter()
    looped = []
    for _ in range(args.steps):
        batch = next(iterator)
        looped.append(batch)
        step(batch)
    synchronize()
    loop_seconds = time.perf_counter() - start

    timed = batches[args.warmup:]
    samples = args.steps * config.train.batch_size
    frames = [int(model.front_end.num_frames(b["audio_lengths"]).max()) + b["tokens"].shape[1] for b in timed]
    print(f"config {args.config}: {model.num_parameters() / 1e6:.2f} M parameters, batch {config.train.batch_size}, "
          f"device {env.device}, {torch.get_num_threads()} threads, {config.data.workers} workers")
    print(f"mean audio per sample {audio_hours(timed) * 3600 / samples:.1f} s, "
          f"mean padded sequence {sum(frames) / len(frames):.0f} positions")
    print(f"{'measure':8} {'samples/s':>10} {'audio h/s':>10} {'s/step':>8}")
    for name, seconds, hours, count in (
            ("data", data_seconds, audio_hours(batches), total * config.train.batch_size),
            ("model", model_seconds, audio_hours(timed), samples),
            ("loop", loop_seconds, audio_hours(looped), samples)):
        steps = count / config.train.batch_size
        print(f"{name:8} {count / seconds:10.2f} {hours / seconds:10.4f} {seconds / steps:8.3f}")


if __name__ == "__main__":
    main()
