"""Train a diarization model from a YAML config: `nanodrz train CONFIG.yaml [--set key=value ...] [--resume PATH]`.

One loop for CPU, one GPU and many (torchrun starts one process per device; rank and world size
come from the environment, gloo on CPU, NCCL on CUDA). Conversations are simulated on the fly by
DataLoader workers, following a curriculum over simulator presets; with `data.recordings`, a share of
the examples is cut from annotated recordings instead (fine-tuning, `nanodrz.recordings`). Every `checkpoint_interval`
steps and at the end, `last.safetensors` + `last.state.safetensors` are written atomically (no pickles:
a shared run folder cannot run code); `--resume` continues from them exactly (same batches, same
optimizer and random states, hence the same losses). A NaN or infinite loss or gradient stops the run
with the checkpoints as they were; non-finite weights are never written.
Validation on fixed conversations of held-out speakers reports loss and DER (collar 0, overlap
scored, greedy decoding) and keeps the best weights as `best.safetensors`.

Run folder: metrics.jsonl, tensorboard/, loss_curve.png, config.yaml, checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nanodrz.annotation import Turn, to_annotation
from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.checkpoint import (Checkpoint, check_tokenizer, load_checkpoint, load_weights, save_checkpoint,
                                weights_path)
from nanodrz.config import from_dict, load_config, to_dict
from nanodrz.decoding import DecodingOptions, decode
from nanodrz.errors import NanodrzError
from nanodrz.examples import (Example, ExampleConfig, ExampleStream, StreamConfig, adapt_preset, collate,
                              example_item, fixed_examples)
from nanodrz.features import bf16_is_fast
from nanodrz.fileio import atomic_open
from nanodrz.model import (DiarizationModel, ModelConfig, activity_loss, activity_targets, sequence_loss,
                           speaker_count_loss)
from nanodrz.paths import default_bank_dir
from nanodrz.recordings import Recording, RecordingsConfig, load_recordings
from nanodrz.recordings import validation_examples as recording_validation_examples
from nanodrz.simulate import check_bank, load_preset
from nanodrz.tokenizer import Tokenizer, TokenizerConfig


@dataclass
class ValidationConfig:
    """Fixed examples from held-out speakers: `conversations` per preset (default: the presets of the
    last curriculum stage, adapted like the training stream), prompted like training, without noise turns."""

    split: str = "validation"
    presets: list[str] | None = None
    conversations: int = 16
    seed: int = 1
    batch_size: int = 8
    max_triples: int = 64
    eos_penalty: float = DecodingOptions.eos_penalty  # the decoding the model will be used with

    def __post_init__(self):
        if self.conversations < 1 or self.batch_size < 1 or self.max_triples < 1:
            raise ValueError("conversations, batch_size and max_triples must be at least 1")
        if self.eos_penalty < 0:
            raise ValueError(f"eos_penalty must not be negative, got {self.eos_penalty:g}")


@dataclass
class DataConfig:
    """bank: bank folder (default: the cache's); workers: DataLoader processes simulating conversations;
    recordings: annotated recordings mixed into the stream (fine-tuning; see `nanodrz.recordings`)."""

    bank: str | None = None
    split: str = "train"
    workers: int = 2
    stream: StreamConfig = field(default_factory=StreamConfig)
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    recordings: RecordingsConfig | None = None

    def __post_init__(self):
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (simulate in the training process) or more, got {self.workers}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr; no weight decay on norms, biases, embeddings.
    new_lr_scale multiplies the learning rate of the parameters `train.init_from` did not provide: layers
    grown onto a trained model start at zero, and at the trained layers' rate (Adam moves every weight by
    about lr per step) they would take thousands of steps to matter. freeze_loaded trains only those new
    parameters: the grown model keeps what it could already do, and a step costs a forward pass."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    new_lr_scale: float = 1.0
    freeze_loaded: bool = False

    def __post_init__(self):
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr {self.lr:g}, min_lr {self.min_lr:g}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0 or not self.new_lr_scale > 0:
            raise ValueError("warmup_steps and weight_decay must not be negative; grad_clip and new_lr_scale must "
                             "be positive")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")


@dataclass
class RunConfig:
    """batch_size is per process; intervals are in steps; out_dir defaults to runs/<config file name>.

    stop_at_step / max_minutes end this session early, with a checkpoint, while the learning-rate
    schedule still spans `steps`: a long run can be split over short sessions (e.g. 10-minute GPU
    calls) with `--resume`, and gives the same result as one session.

    init_from: a checkpoint whose weights start a new run (fine-tuning, or growing a model by a new
    part): every parameter whose name and shape match is copied, the others keep their initialisation;
    the optimizer and schedule start fresh. bf16: autocast on CUDA, and on CPUs with native bfloat16.
    activity_weight: weight of the frame-level activity loss, for models with `model.activity_head`;
    speaker_count_weight: likewise for the speaker-count loss of `model.overlap_head`.
    """

    steps: int = 5000
    batch_size: int = 8
    log_interval: int = 10
    eval_interval: int = 500
    checkpoint_interval: int = 250
    device: str = "auto"
    compile: bool = False
    bf16: bool = True
    seed: int = 0
    out_dir: str | None = None
    wandb: bool = False
    wandb_project: str = "nanodrz"
    stop_at_step: int | None = None
    max_minutes: float | None = None
    init_from: str | None = None
    activity_weight: float = 0.5
    speaker_count_weight: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_interval", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be at least 1 (or unset), got {self.stop_at_step}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive (or unset), got {self.max_minutes:g}")
        if self.activity_weight < 0 or self.speaker_count_weight < 0:
            raise ValueError("activity_weight and speaker_count_weight must not be negative")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.data.examples.chunk_seconds[1] > self.tokenizer.max_seconds:
            raise ValueError("data.examples.chunk_seconds may not exceed tokenizer.max_seconds")


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _interrupt(number, frame) -> None:
    raise KeyboardInterrupt


def catch_stop_signals() -> dict:
    """Make TERM and INT end training the way Ctrl-C does (a checkpoint is saved first); returns the
    handlers to put back. A job scheduler, `timeout` or `kill` sends TERM, and a shell starts background
    jobs with INT ignored: without this, either would lose the steps since the last checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, _interrupt) for number in STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def initialise_from(model: DiarizationModel, checkpoint: Checkpoint) -> list[str]:
    """Copy the checkpoint's tensors that fit `model` by name and shape; returns their names."""
    check_tokenizer(model, checkpoint)
    own = model.state_dict()
    fitting = {name: tensor for name, tensor in checkpoint.weights.items()
               if name in own and own[name].shape == tensor.shape}
    if not fitting:
        raise NanodrzError("train.init_from: no tensor of the checkpoint fits this model")
    model.load_state_dict(fitting, strict=False)
    return sorted(fitting)


def check_resume_compatible(checkpoint_config: dict[str, Any], config: Config) -> None:
    """Model and tokenizer must match; keys the checkpoint lacks (added later) count as their defaults."""
    for section, kind in (("model", ModelConfig), ("tokenizer", TokenizerConfig)):
        try:
            saved = to_dict(from_dict(kind, checkpoint_config.get(section, {}), f"checkpoint {section} config"))
        except (NanodrzError, ValueError, TypeError):
            saved = None
        if saved != to_dict(getattr(config, section)):
            raise NanodrzError(f"cannot resume: the checkpoint's {section} config differs from this config's")


# --- validation -----------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: DiarizationModel, sets: dict[str, list[Example]], batch_size: int, options: DecodingOptions,
             device: torch.device, autocast: Any) -> dict[str, float]:
    """Loss (teacher forcing) and DER of greedy decoding (collar 0, overlap scored, scored over the
    chunk only), over all validation examples and per preset.

    DER maps hypothesis to reference speakers optimally, so it cannot see a prompted speaker given the
    wrong letter. `val_prompted_ier` scores the letters as written (identification error rate, same
    conditions) on the prompted examples: the error long-form stitching inherits.

    With an overlap head, also its loss and, for the frames it calls overlapped (most likely class),
    precision and recall against the frames that are.
    """
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate
    from pyannote.metrics.identification import IdentificationErrorRate

    model.eval()
    tokenizer = model.tokenizer
    total = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    prompted = IdentificationErrorRate(collar=0.0, skip_overlap=False)
    loss_sum, weight_sum = 0.0, 0.0
    count_loss_sum, count_items, overlap_hits, overlap_called, overlap_true = 0.0, 0, 0, 0, 0
    metrics = {}
    for name, examples in sets.items():
        per_preset = DiarizationErrorRate(collar=0.0, skip_overlap=False)
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = {k: v.to(device) for k, v in collate([example_item(e, tokenizer, 1.0) for e in chunk]).items()}
            with autocast():
                if model.speaker_count is not None:
                    logits, heads, frames = model(batch["audio"], batch["audio_lengths"], batch["tokens"],
                                                  batch["token_lengths"], frame_heads=True)
                    counts = heads["speaker_count"]
                    count_loss_sum += float(speaker_count_loss(counts, frames, batch["spans"],
                                                               model.config.frame_rate)) * len(chunk)
                    count_items += len(chunk)
                    real = torch.arange(counts.shape[1], device=device) < frames[:, None]
                    truth = activity_targets(batch["spans"], counts.shape[1], model.config.frame_rate,
                                             model.tokenizer.num_speakers).sum(-1) >= 2
                    called = (counts.argmax(-1) == 2) & real
                    overlap_hits += int((called & truth).sum())
                    overlap_called += int(called.sum())
                    overlap_true += int((truth & real).sum())
                else:
                    logits = model(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
                weights = float(batch["weights"][:, 1:].sum())
                loss_sum += float(sequence_loss(logits, batch["tokens"], batch["weights"])) * weights
                weight_sum += weights
                results = decode(model, [e.audio for e in chunk], [e.prompt for e in chunk], options)
            for index, (example, result) in enumerate(zip(chunk, results)):
                uri = f"{name}{first + index}"
                uem = Timeline([Segment(example.chunk_start, len(example.audio) / SAMPLE_RATE)])
                reference, hypothesis = to_annotation(example.turns, uri), to_annotation(result.turns, uri)
                for metric in (total, per_preset):
                    metric(reference, hypothesis, uem=uem)
                if example.prompt:
                    letters = example.encode(tokenizer).letters
                    lettered = [Turn(t.start, t.end, letters[t.speaker]) for t in example.turns]
                    prompted(to_annotation(lettered, uri), hypothesis, uem=uem)
        metrics[f"val_der_{name}"] = abs(per_preset)
    if count_items:
        metrics["val_speaker_count_loss"] = count_loss_sum / count_items
        metrics["val_overlap_precision"] = overlap_hits / max(overlap_called, 1)
        metrics["val_overlap_recall"] = overlap_hits / max(overlap_true, 1)
    return {"val_loss": loss_sum / max(weight_sum, 1e-8), "val_der": abs(total),
            "val_prompted_ier": abs(prompted), **metrics}


# --- logging --------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line a crash tore (or any line that is not a record with a
    step) is skipped with a warning instead of blocking every later `--resume`."""
    if not path.is_file():
        return []
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        print(f"nanodrz train: warning: {path}: skipped {skipped} unreadable line(s)", file=sys.stderr)
    return records


class RunLog:
    """metrics.jsonl (the record), TensorBoard, optional W&B, and the loss-curve PNG; main process only."""

    def __init__(self, run_dir: Path, start_step: int, config: Config):
        self.path = run_dir / "metrics.jsonl"
        # A resumed run drops what was logged after its checkpoint.
        kept = [record for record in read_metrics(self.path) if record["step"] <= start_step]
        with atomic_open(self.path) as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in kept))
        from torch.utils.tensorboard import SummaryWriter
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        self.wandb = None
        if config.train.wandb:
            try:
                import wandb
            except ImportError:
                raise NanodrzError("train.wandb is true but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=config.train.wandb_project, config=to_dict(config),
                                    dir=str(run_dir), resume="allow")
        self.run_dir = run_dir

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            loss_axis.plot(*zip(*train), label="train", alpha=0.8)
        if val:
            steps = [r["step"] for r in val]
            loss_axis.plot(steps, [r["val_loss"] for r in val], "o-", label="validation")
            error_axis.plot(steps, [100 * r["val_der"] for r in val], "o-", color="C2", label="DER")
            ier = [(r["step"], 100 * r["val_prompted_ier"]) for r in val if "val_prompted_ier" in r]
            if ier:
                error_axis.plot(*zip(*ier), "s--", color="C3", label="prompted, letters as written (IER)")
            for key, marker, label in (("val_overlap_precision", "^:", "overlap head: precision"),
                                       ("val_overlap_recall", "v:", "overlap head: recall")):
                points = [(r["step"], 100 * r[key]) for r in val if key in r]
                if points:
                    error_axis.plot(*zip(*points), marker, label=label)
            error_axis.legend()
        counts = [(r["step"], r["speaker_count_loss"]) for r in records if "speaker_count_loss" in r]
        if counts:  # the overlap head's loss, on the same axis
            loss_axis.plot(*zip(*counts), alpha=0.8, label="train, speaker counts")
            val_counts = [(r["step"], r["val_speaker_count_loss"]) for r in val if "val_speaker_count_loss" in r]
            if val_counts:
                loss_axis.plot(*zip(*val_counts), "o-", label="validation, speaker counts")
        loss_axis.set(xlabel="step", ylabel="cross-entropy per answer token (or frame)", yscale="log", title="loss")
        loss_axis.legend()
        error_axis.set(xlabel="step", ylabel="% (collar 0, overlap scored)", title="validation errors")
        figure.tight_layout()
        with atomic_open(self.run_dir / "loss_curve.png", "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        plt.close(figure)

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# --- the loop -------------------------------------------------------------------------------------
def train(config: Config, resume: str | None = None) -> dict[str, Any]:
    """Train as configured; returns the last logged metrics (main process)."""
    env = setup_distributed(config.train.device)
    run_dir = Path(config.train.out_dir or "runs/default")
    bank_root = Path(config.data.bank) if config.data.bank else default_bank_dir()
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
        start_step, best_der = checkpoint.step, checkpoint.state["best_der"]
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

    stream = ExampleStream(bank_root, config.data.split, config.data.stream, config.data.examples, tokenizer,
                           config.train.batch_size, config.train.seed, start_step, env.rank, env.world_size,
                           recordings.source if recordings is not None else None)
    # The loader's own generator keeps it from drawing on the global one, which dropout uses.
    loader = DataLoader(stream, batch_size=None, num_workers=config.data.workers,
                        prefetch_factor=2 if config.data.workers else None, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.train.seed))
    use_bf16 = config.train.bf16 and bf16_is_fast(env.device)

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    log = validation = None
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        log = RunLog(run_dir, start_step, config)
        validation = validation_examples(config, bank_root, tokenizer,
                                         recordings.held_out if recordings is not None else None)
        print(f"nanodrz train: {model.num_parameters() / 1e6:.2f} M parameters, device {env.device}, "
              f"{env.world_size} process(es), run folder {run_dir}")
        if recordings is not None:
            print(f"nanodrz train: {recordings.describe()}")

    def save(step: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_states(), "best_der": best_der, "audio_hours_seen": total_audio_hours,
                 "new_parameters": new_names}
        save_checkpoint(run_dir / "last.safetensors", model, step, to_dict(config), state)

    step = start_step
    last_record: dict[str, Any] = {}
    progress = tqdm(total=config.train.steps, initial=start_step, disable=not env.main, desc="train",
                    dynamic_ncols=True)
    window_loss, window_steps, window_audio, window_samples, window_start = 0.0, 0, 0.0, 0, time.perf_counter()
    window_activity = window_count = 0.0
    total_audio_hours = checkpoint.state.get("audio_hours_seen", 0.0) if checkpoint is not None else 0.0
    session_start = time.perf_counter()
    batches = iter(loader)
    previous_handlers = catch_stop_signals()
    try:
        while step < config.train.steps:
            batch = {k: v.to(env.device, non_blocking=True) for k, v in next(batches).items()}
            net.train()
            with autocast():
                if model.activity is not None or model.speaker_count is not None:
                    logits, heads, frames = net(batch["audio"], batch["audio_lengths"], batch["tokens"],
                                                batch["token_lengths"], frame_heads=True)
                    loss = token_loss = sequence_loss(logits, batch["tokens"], batch["weights"])
                    if "activity" in heads:
                        frame_loss = activity_loss(heads["activity"], frames, batch["spans"], config.model.frame_rate)
                        window_activity += float(frame_loss.detach())
                        loss = loss + config.train.activity_weight * frame_loss
                    if "speaker_count" in heads:
                        count_loss = speaker_count_loss(heads["speaker_count"], frames, batch["spans"],
                                                        config.model.frame_rate)
                        window_count += float(count_loss.detach())
                        loss = loss + config.train.speaker_count_weight * count_loss
                else:
                    logits = net(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
                    loss = token_loss = sequence_loss(logits, batch["tokens"], batch["weights"])
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            # Gradients are all-reduced, so every rank sees the same norm and stops at the same step.
            if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):
                raise NanodrzError(f"step {step + 1}: the loss or the gradients are not finite (loss "
                                   f"{float(loss.detach()):g}, gradient norm {float(grad_norm):g}); training stopped and "
                                   f"the checkpoints in {run_dir} were kept as they were. Lower optim.lr or check "
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
                if model.activity is not None:  # this rank's mean; `loss` is the token loss alone
                    last_record["activity_loss"] = window_activity / window_steps
                if model.speaker_count is not None:
                    last_record["speaker_count_loss"] = window_count / window_steps
                log.write(last_record)
                progress.set_postfix(loss=f"{last_record['loss']:.3f}", lr=f"{last_record['lr']:.2e}")
                window_loss, window_steps, window_audio, window_samples, window_activity, window_count = 0.0, 0, 0.0, 0, 0.0, 0.0
                window_start = time.perf_counter()
            if step % config.train.eval_interval == 0 or step == config.train.steps:
                if env.main:
                    metrics = validate(model, validation, config.data.validation.batch_size,
                                       validation_options(config.data.validation), env.device, autocast)
                    log.write({"step": step, **metrics})
                    last_record = {**last_record, **metrics}
                    tqdm.write(f"step {step}: val loss {metrics['val_loss']:.4f}, val DER {100 * metrics['val_der']:.2f}%")
                    if metrics["val_der"] < best_der:
                        best_der = metrics["val_der"]
                        save_checkpoint(run_dir / "best.safetensors", model, step, to_dict(config))
                    log.plot()
                if env.world_size > 1:
                    dist.barrier()
            stop = step == config.train.stop_at_step or (
                config.train.max_minutes is not None and time.perf_counter() - session_start > 60 * config.train.max_minutes)
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


def validation_options(validation: ValidationConfig) -> DecodingOptions:
    return DecodingOptions(max_triples=validation.max_triples, eos_penalty=validation.eos_penalty)


def validation_examples(config: Config, bank_root: Path, tokenizer: Tokenizer,
                        held_out: list[Recording] | None = None) -> dict[str, list[Example]]:
    """{preset name: examples} of the validation set, and `recordings`: chunks of the held-out recordings."""
    validation, stream = config.data.validation, config.data.stream
    names = validation.presets or list(stream.curriculum.stages[-1].presets)
    bank = Bank(bank_root, validation.split)
    examples = dataclasses.replace(config.data.examples, noise_turns=0.0)
    sets = {}
    for name in names:
        simulation = adapt_preset(load_preset(name), stream, tokenizer.num_speakers, name)
        check_bank(bank, simulation)
        sets[name] = fixed_examples(bank, simulation, examples, tokenizer.config.max_seconds,
                                    validation.conversations, validation.seed)
    if held_out:
        sets["recordings"] = recording_validation_examples(held_out, examples, tokenizer.config.max_seconds,
                                                           validation.conversations, validation.seed)
    return sets
