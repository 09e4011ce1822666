"""The record of a training run: metrics.jsonl, TensorBoard, optional Weights & Biases, the loss curve.

metrics.jsonl is the record; the rest is drawn from it. A resumed run first drops what was logged after
its checkpoint, so the record reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nanodrz.config import to_dict
from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_open
from nanodrz.training_config import Config


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
            error_axis.plot(steps, [100 * r["val_der"] for r in val], "o-", color="C2", label="DER (chunks)")
            pipeline = [(r["step"], 100 * r["val_pipeline_der"]) for r in val if "val_pipeline_der" in r]
            if pipeline:  # what best.safetensors is chosen on
                error_axis.plot(*zip(*pipeline), "D-", color="C1", label="DER (long-form pipeline)")
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
