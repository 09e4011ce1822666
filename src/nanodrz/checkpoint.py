"""Checkpoints: weights as safetensors, plus a torch sidecar with everything needed to resume exactly.

`NAME.safetensors` holds the model weights and, in its metadata, the format version, the step, the
full training config and the tokenizer spec (JSON), so a weights file alone is enough to run the model
and to know what it is. `NAME.state.pt` (training checkpoints only) holds optimizer and scheduler
state and the random generator states. Both are written atomically, sidecar first; the step stored
in each must agree, so a crash between the two writes is detected instead of resuming a mismatched pair.

Anything wrong with a checkpoint (missing, corrupt, another format version, another tokenizer or
model shape) is a one-line NanodrzError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanodrz.config import from_dict
from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_path
from nanodrz.model import DiarizationModel, ModelConfig
from nanodrz.tokenizer import Tokenizer

CHECKPOINT_FORMAT = "nanodrz-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    step: int
    config: dict[str, Any]
    tokenizer_spec: dict[str, Any]
    state: dict[str, Any] | None


def weights_path(path: str | Path) -> Path:
    """`run_dir` -> run_dir/last.safetensors; `x.safetensors` or `x.state.pt` -> x.safetensors."""
    path = Path(path)
    if path.is_dir():
        return path / "last.safetensors"
    if path.name.endswith(".state.pt"):
        return path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    return path


def state_path(weights: Path) -> Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + ".state.pt")


def save_checkpoint(path: str | Path, model: DiarizationModel, step: int, config: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Write `path` (.safetensors) and, when `state` is given, its `.state.pt` sidecar."""
    path = Path(path)
    if state is not None:
        with atomic_path(state_path(path)) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, **state}, tmp)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "step": str(step),
        "config": json.dumps(config),
        "tokenizer": json.dumps(model.tokenizer.spec()),
    }
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return path


def load_checkpoint(path: str | Path, with_state: bool = False) -> Checkpoint:
    path = weights_path(path)
    if not path.is_file():
        raise NanodrzError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weights = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise NanodrzError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise NanodrzError(f"{path}: not a nanodrz checkpoint")
    if metadata.get("version") != str(CHECKPOINT_VERSION):
        raise NanodrzError(f"{path}: checkpoint format version {metadata.get('version')} is not "
                           f"{CHECKPOINT_VERSION}; it was written by another nanodrz version")
    step = int(metadata["step"])
    state = None
    if with_state:
        sidecar = state_path(path)
        if not sidecar.is_file():
            raise NanodrzError(f"{path}: no training state ({sidecar.name}) to resume from")
        try:
            state = torch.load(sidecar, map_location="cpu", weights_only=False)
        except Exception as error:  # a torn or foreign pickle can fail in many ways
            raise NanodrzError(f"{sidecar}: unreadable training state ({type(error).__name__})") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("step") != step:
            raise NanodrzError(f"{sidecar}: training state does not belong to {path.name} (step mismatch)")
    return Checkpoint(weights, step, json.loads(metadata["config"]), json.loads(metadata["tokenizer"]), state)


def build_model(checkpoint: Checkpoint) -> DiarizationModel:
    """The model a checkpoint describes, with its weights loaded (on CPU, in eval mode)."""
    tokenizer = Tokenizer.from_spec(checkpoint.tokenizer_spec)
    model_config = from_dict(ModelConfig, checkpoint.config.get("model", {}), "checkpoint model config")
    model = DiarizationModel(model_config, tokenizer)
    load_weights(model, checkpoint)
    return model.eval()


def check_tokenizer(model: DiarizationModel, checkpoint: Checkpoint) -> None:
    """Weights only mean something with the vocabulary they were trained on."""
    if Tokenizer.from_spec(checkpoint.tokenizer_spec).spec() != model.tokenizer.spec():
        raise NanodrzError("checkpoint tokenizer differs from the configured one "
                           f"({checkpoint.tokenizer_spec} vs {model.tokenizer.spec()})")


def load_weights(model: DiarizationModel, checkpoint: Checkpoint) -> None:
    """Copy checkpoint weights into `model`, checking that vocabulary and shapes agree."""
    check_tokenizer(model, checkpoint)
    expected = model.state_dict()
    if set(expected) != set(checkpoint.weights) or any(
            expected[k].shape != checkpoint.weights[k].shape for k in expected):
        raise NanodrzError("checkpoint weights do not fit the configured model (another model config?)")
    model.load_state_dict(checkpoint.weights)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DiarizationModel:
    """A trained model from a .safetensors checkpoint (or a run folder), ready for `decoding.decode`."""
    return build_model(load_checkpoint(path)).to(device)
