"""The training config: `nanodrz train CONFIG.yaml` reads these dataclasses (see configs/*.yaml).

Every section rejects unknown keys and checks its ranges when it is made (`nanodrz.config`), so a typo or
an impossible value is a one-line `ConfigError` before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nanodrz.bank import SPLITS
from nanodrz.errors import ConfigError
from nanodrz.examples import ExampleConfig
from nanodrz.model import ModelConfig
from nanodrz.params import PipelineParams
from nanodrz.paths import default_bank_dir
from nanodrz.recordings import RecordingsConfig
from nanodrz.stream import StreamConfig
from nanodrz.tokenizer import TokenizerConfig


def check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{name} = {split!r}: unknown split (choose from {', '.join(SPLITS)})")


@dataclass
class ValidationConfig:
    """Fixed sets of held-out speakers: `conversations` per preset (default: the presets of the last
    curriculum stage, adapted like the training stream). Two measures, each on the model as it will be used:
    chunks cut from those conversations, prompted like training, without noise turns, decoded one by one
    (loss and DER per chunk); and the same conversations diarized whole by the shipped pipeline under
    `pipeline` (`nanodrz.params.PipelineParams`, defaults where a key is absent), which picks the best
    checkpoint and is stored in the checkpoints, since it is what the model was chosen under."""

    split: str = "validation"
    presets: list[str] | None = None
    conversations: int = 16
    seed: int = 1
    batch_size: int = 8
    pipeline: PipelineParams = field(default_factory=PipelineParams)

    def __post_init__(self):
        check_split("data.validation.split", self.split)
        if self.conversations < 1 or self.batch_size < 1:
            raise ConfigError("data.validation.conversations and batch_size must be at least 1")


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
        check_split("data.split", self.split)
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (simulate in the training process) or more, got {self.workers}")

    def bank_root(self) -> Path:
        return Path(self.bank) if self.bank else default_bank_dir()


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
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr {self.lr:g}, min_lr {self.min_lr:g}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0 or not self.new_lr_scale > 0:
            raise ConfigError("warmup_steps and weight_decay must not be negative; grad_clip and new_lr_scale must "
                             "be positive")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {list(self.betas)}")


@dataclass
class RunConfig:
    """batch_size is per process; intervals are in steps; out_dir defaults to runs/<config file name>.

    stop_at_step / max_minutes end this session early, with a checkpoint, while the learning-rate
    schedule still spans `steps`: a long run can be split over short sessions (e.g. 10-minute GPU
    calls) with `--resume`, and gives the same result as one session.

    init_from: a checkpoint whose weights start a new run (fine-tuning, or growing a model by a new
    part): every parameter whose name and shape match is copied, the others keep their initialisation;
    the optimizer and schedule start fresh. bf16: autocast on CUDA, and on CPUs with native bfloat16.
    speaker_count_weight: weight of the frame-level speaker-count loss, for models with `model.overlap_head`.
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
    speaker_count_weight: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_interval", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"stop_at_step must be at least 1 (or unset), got {self.stop_at_step}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be positive (or unset), got {self.max_minutes:g}")
        if self.speaker_count_weight < 0:
            raise ConfigError("speaker_count_weight must not be negative")


@dataclass
class Config:
    """Everything `nanodrz train` reads, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.data.examples.chunk_seconds[1] > self.tokenizer.max_seconds:
            raise ConfigError("data.examples.chunk_seconds may not exceed tokenizer.max_seconds")
