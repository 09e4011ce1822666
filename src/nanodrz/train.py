"""Train a diarization model from a YAML config: `nanodrz train CONFIG.yaml [--set key=value ...] [--resume PATH]`.

One loop for CPU, one GPU and many (torchrun starts one process per device; rank and world size
come from the environment, gloo on CPU, NCCL on CUDA). Conversations are simulated on the fly by
DataLoader workers, following a curriculum over simulator presets; with `data.recordings`, a share of
the examples is cut from annotated recordings instead (fine-tuning, `nanodrz.recordings`). Every `checkpoint_interval`
steps and at the end, `last.safetensors` + `last.state.safetensors` are written atomically (no pickles:
a shared run folder cannot run code); `--resume` continues from them exactly (same batches, same
optimizer and random states, hence the same losses). A NaN or infinite loss or gradient stops the run
with the checkpoints as they were; non-finite weights are never written.
Validation on fixed conversations of held-out speakers reports loss and DER per chunk (collar 0, overlap
scored), and the DER of the shipped long-form pipeline on the same conversations whole
(`val_pipeline_der`, under `data.validation.pipeline`), which keeps the best weights as `best.safetensors`.
Every checkpoint stores those pipeline parameters, so it diarizes as it was validated.

Run folder: metrics.jsonl, tensorboard/, loss_curve.png, config.yaml, checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nanodrz.audio import SAMPLE_RATE
from nanodrz.checkpoint import load_checkpoint, load_weights, save_checkpoint, weights_path
from nanodrz.config import load_config, to_dict
from nanodrz.errors import NanodrzError
from nanodrz.examples import ExampleItems, collate
from nanodrz.features import bf16_is_fast
from nanodrz.model import DiarizationModel, sequence_loss, speaker_count_loss
from nanodrz.recordings import RecordingSource, load_recordings
from nanodrz.run_log import RunLog
from nanodrz.run_state import (catch_stop_signals, check_resume_compatible, initialise_from, restore_rng_states,
                               restore_signals, rng_states, seed_everything)
from nanodrz.stream import ConversationStream
from nanodrz.tokenizer import Tokenizer
from nanodrz.training_config import Config, OptimConfig
from nanodrz.validation import pipeline_recordings, validate, validate_pipeline, validation_examples

BEST_METRIC = "val_pipeline_der"  # the metric that picks best.safetensors; resume states record it


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--resume", metavar="PATH", help="continue from a run folder or checkpoint")


def run(args: argparse.Namespace) -> int:
    config = load_config(Config, args.config, args.set)
    if config.train.out_dir is None:
        config.train.out_dir = str(Path("runs") / Path(args.config).stem)
    train(config, resume=args.resume)
    return 0


# --- set-up -------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Rank and world size from torchrun's environment; one process per device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NanodrzError("train.device is cuda but no CUDA device is available")
        device = torch.device("cuda", local_rank if world_size > 1 else torch.device(device_name).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return Distributed(rank, world_size, device)


def parameter_groups(model: torch.nn.Module, optim: OptimConfig, new_names: Iterable[str] = ()
                     ) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels only: norms, biases and embeddings are not decayed. Parameters named
    in `new_names` get their own groups at optim.new_lr_scale times the learning rate."""
    new_names = set(new_names)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decayed = parameter.dim() >= 2 and "embedding" not in name
        groups.setdefault((decayed, name in new_names), []).append(parameter)
    return [{"params": parameters, "weight_decay": optim.weight_decay if decayed else 0.0,
             "lr": optim.lr * (optim.new_lr_scale if new else 1.0)}
            for (decayed, new), parameters in sorted(groups.items())]


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr: linear warmup, then cosine from 1 down to min_lr / lr."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    floor = optim.min_lr / optim.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_stream(config: Config, tokenizer: Tokenizer, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                    recordings: RecordingSource | None = None) -> ConversationStream:
    """The run's batches of examples (`nanodrz.stream`), from batch `start_batch` on (a resumed run's step)."""
    return ConversationStream(config.data.bank_root(), config.data.split,
                              config.data.stream.schedule(tokenizer.num_speakers), config.train.seed,
                              batch_size=config.train.batch_size, start_batch=start_batch, rank=rank,
                              world_size=world_size, recordings=recordings,
                              transform=ExampleItems(config.data.examples, tokenizer), collate=collate)


# --- the loop -------------------------------------------------------------------------------------
def training_losses(net: torch.nn.Module, model: DiarizationModel, batch: dict[str, torch.Tensor], config: Config
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise, the token loss alone (logged as `loss`), and the loss of the model's frame head
    (`speaker_count_loss`, of `model.overlap_head`), which the first one adds at its configured weight."""
    if model.speaker_count is None:
        logits = net(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
        token_loss = sequence_loss(logits, batch["tokens"], batch["weights"])
        return token_loss, token_loss, {}
    logits, heads, frames = net(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"],
                                frame_heads=True)
    token_loss = sequence_loss(logits, batch["tokens"], batch["weights"])
    count_loss = speaker_count_loss(heads["speaker_count"], frames, batch["spans"], config.model.frame_rate)
    return token_loss + config.train.speaker_count_weight * count_loss, token_loss, {"speaker_count_loss": count_loss}


def train(config: Config, resume: str | None = None) -> dict[str, Any]:
    """Train as configured; returns the last logged metrics (main process)."""
    env = setup_distributed(config.train.device)
    run_dir = Path(config.train.out_dir or "runs/default")
    tokenizer = Tokenizer(config.tokenizer)
    checkpoint = load_checkpoint(resume, with_state=True) if resume else None
    if checkpoint is None and weights_path(run_dir).is_file():
        raise NanodrzError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                           "or set train.out_dir to a new folder")
    if checkpoint is not None:
        check_resume_compatible(checkpoint.config, config)
    recordings = load_recordings(config.data.recordings, tokenizer.num_speakers) if config.data.recordings else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = DiarizationModel(config.model, tokenizer)
    start_step, best_der, new_names = 0, math.inf, []
    if checkpoint is not None:
        load_weights(model, checkpoint)
        start_step = checkpoint.step
        # A run from before the pipeline validated kept its best per-chunk DER: not comparable, start afresh.
        if checkpoint.state.get("best_metric") == BEST_METRIC:
            best_der = checkpoint.state["best_der"]
        new_names = checkpoint.state.get("new_parameters", [])
    elif config.train.init_from:
        copied = initialise_from(model, load_checkpoint(config.train.init_from))
        new_names = [name for name, _ in model.named_parameters() if name not in copied]
        if env.main:
            print(f"nanodrz train: {len(copied)} of {len(model.state_dict())} tensors copied from "
                  f"{config.train.init_from}")
    if config.optim.freeze_loaded:
        if not new_names:
            raise NanodrzError("optim.freeze_loaded needs train.init_from and a model with parameters it does "
                               "not provide")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in new_names)
    model.to(env.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim, new_names), lr=config.optim.lr,
                                  betas=config.optim.betas, fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.optim, config.train.steps))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        scheduler.load_state_dict(checkpoint.state["scheduler"])
        restore_rng_states(checkpoint.state["rng"])
    else:  # dropout draws from the global generators; they are part of the run's state
        seed_everything(config.train.seed * 1000 + env.rank)
    net: torch.nn.Module = model
    if env.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if config.train.compile:
        net = torch.compile(net)

    stream = training_stream(config, tokenizer, start_step, env.rank, env.world_size,
                             recordings.source if recordings is not None else None)
    # The loader's own generator keeps it from drawing on the global one, which dropout uses.
    loader = DataLoader(stream, batch_size=None, num_workers=config.data.workers,
                        prefetch_factor=2 if config.data.workers else None, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.train.seed))
    use_bf16 = config.train.bf16 and bf16_is_fast(env.device)

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    log = validation = whole = None
    pipeline = config.data.validation.pipeline
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        log = RunLog(run_dir, start_step, config)
        held_out = recordings.held_out if recordings is not None else None
        validation = validation_examples(config, config.data.bank_root(), tokenizer, held_out)
        whole = pipeline_recordings(config, config.data.bank_root(), tokenizer, held_out)
        print(f"nanodrz train: {model.num_parameters() / 1e6:.2f} M parameters, device {env.device}, "
              f"{env.world_size} process(es), run folder {run_dir}")
        if recordings is not None:
            print(f"nanodrz train: {recordings.describe()}")

    def save(step: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_states(), "best_der": best_der, "best_metric": BEST_METRIC,
                 "audio_hours_seen": total_audio_hours, "new_parameters": new_names}
        save_checkpoint(run_dir / "last.safetensors", model, step, to_dict(config), state, pipeline)

    step = start_step
    last_record: dict[str, Any] = {}
    progress = tqdm(total=config.train.steps, initial=start_step, disable=not env.main, desc="train",
                    dynamic_ncols=True)
    window_loss, window_steps, window_audio, window_samples, window_start = 0.0, 0, 0.0, 0, time.perf_counter()
    window_heads: dict[str, float] = {}  # the frame head's loss, this rank's
    total_audio_hours = checkpoint.state.get("audio_hours_seen", 0.0) if checkpoint is not None else 0.0
    session_start = time.perf_counter()
    batches = iter(loader)
    previous_handlers = catch_stop_signals()
    try:
        while step < config.train.steps:
            batch = {k: v.to(env.device, non_blocking=True) for k, v in next(batches).items()}
            net.train()
            with autocast():
                loss, token_loss, head_losses = training_losses(net, model, batch, config)
            for name, value in head_losses.items():
                window_heads[name] = window_heads.get(name, 0.0) + float(value.detach())
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            # Gradients are all-reduced, so every rank sees the same norm and stops at the same step.
            if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):
                raise NanodrzError(f"step {step + 1}: the loss or the gradients are not finite (loss "
                                   f"{float(loss.detach()):g}, gradient norm {float(grad_norm):g}); training stopped "
                                   f"and the checkpoints in {run_dir} were kept as they were. Lower optim.lr or check "
                                   "the data and the checkpoint you started from")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            totals = torch.stack([token_loss.detach().float(), batch["audio_lengths"].sum().float() / SAMPLE_RATE])
            if env.world_size > 1:
                dist.all_reduce(totals)
            loss_value, audio_seconds = float(totals[0]) / env.world_size, float(totals[1])
            window_loss += loss_value
            window_steps += 1
            window_audio += audio_seconds
            window_samples += len(batch["audio_lengths"]) * env.world_size
            total_audio_hours += audio_seconds / 3600
            progress.update(1)
            if env.main and (step % config.train.log_interval == 0 or step == config.train.steps):
                elapsed = time.perf_counter() - window_start
                last_record = {"step": step, "loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "samples_per_s": window_samples / elapsed,
                               "audio_hours_per_s": window_audio / 3600 / elapsed,
                               "audio_hours_seen": total_audio_hours}
                # `loss` is the token loss alone; the frame head's loss is this rank's mean
                last_record.update({name: total / window_steps for name, total in window_heads.items()})
                log.write(last_record)
                progress.set_postfix(loss=f"{last_record['loss']:.3f}", lr=f"{last_record['lr']:.2e}")
                window_loss, window_steps, window_audio, window_samples, window_heads = 0.0, 0, 0.0, 0, {}
                window_start = time.perf_counter()
            if step % config.train.eval_interval == 0 or step == config.train.steps:
                if env.main:
                    batch_size = config.data.validation.batch_size
                    metrics = validate(model, validation, batch_size, pipeline.decoding, env.device, autocast)
                    metrics.update(validate_pipeline(model, whole, to_dict(config), pipeline, batch_size))
                    log.write({"step": step, **metrics})
                    last_record = {**last_record, **metrics}
                    tqdm.write(f"step {step}: val loss {metrics['val_loss']:.4f}, val DER per chunk "
                               f"{100 * metrics['val_der']:.2f}%, pipeline {100 * metrics[BEST_METRIC]:.2f}%")
                    if metrics[BEST_METRIC] < best_der:
                        best_der = metrics[BEST_METRIC]
                        save_checkpoint(run_dir / "best.safetensors", model, step, to_dict(config), pipeline=pipeline)
                    log.plot()
                if env.world_size > 1:
                    dist.barrier()
            minutes = (time.perf_counter() - session_start) / 60
            stop = step == config.train.stop_at_step or (
                config.train.max_minutes is not None and minutes > config.train.max_minutes)
            if env.world_size > 1:  # every rank must stop at the same step
                flag = torch.tensor(float(stop), device=env.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag)
            if env.main and (step % config.train.checkpoint_interval == 0 or step == config.train.steps or stop):
                save(step)
            if stop:
                if env.main:
                    tqdm.write(f"session ends at step {step}; continue with --resume {run_dir}")
                break
        if env.world_size > 1:
            # Tear down together: a rank that leaves while another still saves can abort in gloo's threads.
            dist.barrier()
    except KeyboardInterrupt:
        if env.main and step > start_step:
            save(step)
            tqdm.write(f"interrupted: checkpoint of step {step} saved in {run_dir}")
        raise
    finally:
        restore_signals(previous_handlers)
        progress.close()
        if log is not None:
            log.close()
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return last_record
