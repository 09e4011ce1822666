"""Checkpoints: weights as safetensors, plus a safetensors sidecar with everything needed to resume exactly.

`NAME.safetensors` holds the model weights and, in its metadata, the format version, the step, the
full training config, the tokenizer spec and, once tuned (`nanodrz tune`), the pipeline parameters
chosen for it (JSON), so a weights file alone is enough to run the model as it was tuned and to know
what it is. `NAME.state.safetensors` (training checkpoints only) holds optimizer and
scheduler state and the random generator states: its tensors as safetensors, the structure around
them as JSON in the metadata. Neither format can run code when read: run folders get shared, and a
pickle (`torch.load`) executes whatever its author put in it. Both are written atomically, sidecar
first; the step stored in each must agree, so a crash between the two writes is detected instead of
resuming a mismatched pair.

Anything wrong with a checkpoint (missing, corrupt, another format version, malformed metadata,
non-finite tensors, another tokenizer or model shape) is a one-line NanodrzError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanodrz.config import from_dict
from nanodrz.errors import NanodrzError
from nanodrz.fileio import atomic_path
from nanodrz.model import DiarizationModel, ModelConfig
from nanodrz.params import PipelineParams
from nanodrz.tokenizer import Tokenizer

CHECKPOINT_FORMAT = "nanodrz-checkpoint"
CHECKPOINT_VERSION = 1
STATE_SUFFIX = ".state.safetensors"
PICKLED_STATE_SUFFIX = ".state.pt"  # written by nanodrz before state files became safetensors


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    step: int
    config: dict[str, Any]
    tokenizer_spec: dict[str, Any]
    state: dict[str, Any] | None
    pipeline: PipelineParams | None = None  # None: not tuned, `PipelineParams()` defaults


def weights_path(path: str | Path) -> Path:
    """`run_dir` -> run_dir/last.safetensors; `x.safetensors` or `x.state.safetensors` -> x.safetensors."""
    path = Path(path)
    if path.is_dir():
        return path / "last.safetensors"
    for suffix in (STATE_SUFFIX, PICKLED_STATE_SUFFIX):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".safetensors")
    return path


def state_path(weights: Path, suffix: str = STATE_SUFFIX) -> Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + suffix)


# --- nested state <-> (JSON skeleton, flat tensors) ----------------------------------------------
def flatten_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `value` in which every tensor or array is a reference into `tensors`.

    Dicts whose keys are not all strings (an optimizer's per-parameter state is keyed by index) and
    tuples are tagged so that `unflatten_state` gives back exactly what was saved.
    """
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten_state(item, tensors) for item in value]}
    if isinstance(value, list):
        return [flatten_state(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: flatten_state(item, tensors) for key, item in value.items()}
        return {"__items__": [[flatten_state(key, tensors), flatten_state(item, tensors)]
                              for key, item in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a training state")


def unflatten_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `flatten_state`; a reference to a missing tensor is a ValueError."""
    if isinstance(value, list):
        return [unflatten_state(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if value.keys() == {"__ndarray__"}:
        return tensors[value["__ndarray__"]].numpy()
    if value.keys() == {"__tuple__"}:
        return tuple(unflatten_state(item, tensors) for item in value["__tuple__"])
    if value.keys() == {"__items__"}:
        return {unflatten_state(key, tensors): unflatten_state(item, tensors) for key, item in value["__items__"]}
    return {key: unflatten_state(item, tensors) for key, item in value.items()}


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


# --- writing and reading ------------------------------------------------------------------------
def header(step: int) -> dict[str, str]:
    return {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "step": str(step)}


def write_state(path: Path, step: int, state: dict[str, Any]) -> None:
    """Write a training state (nested dicts, lists, tuples, numbers, tensors, arrays) as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**header(step), "state": json.dumps(skeleton)})


def save_checkpoint(path: str | Path, model: DiarizationModel, step: int, config: dict[str, Any],
                    state: dict[str, Any] | None = None, pipeline: PipelineParams | None = None) -> Path:
    """Write `path` (.safetensors) and, when `state` is given, its `.state.safetensors` sidecar.

    Non-finite weights are refused: they would replace a good checkpoint with a useless one.
    """
    path = Path(path)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    bad = non_finite_tensor(weights)
    if bad is not None:
        raise NanodrzError(f"refusing to write {path}: weight {bad} is not finite (NaN or infinity)")
    if state is not None:
        write_state(state_path(path), step, state)
    metadata = {**header(step), "config": json.dumps(config), "tokenizer": json.dumps(model.tokenizer.spec())}
    if pipeline is not None:
        metadata["pipeline"] = json.dumps(pipeline.to_dict())
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return path


def store_pipeline(path: str | Path, pipeline: PipelineParams) -> None:
    """Rewrite a checkpoint (atomically) with `pipeline` as its tuned parameters; weights unchanged."""
    path = weights_path(path)
    if not path.is_file():
        raise NanodrzError(f"no checkpoint at {path}")
    metadata, weights = read_safetensors(path)
    metadata["pipeline"] = json.dumps(pipeline.to_dict())
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp), metadata=metadata)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file, with checks that hold for every nanodrz file in it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise NanodrzError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise NanodrzError(f"{path}: not a nanodrz checkpoint")
    if metadata.get("version") != str(CHECKPOINT_VERSION):
        raise NanodrzError(f"{path}: checkpoint format version {metadata.get('version')} is not "
                           f"{CHECKPOINT_VERSION}; it was written by another nanodrz version")
    step = metadata.get("step", "")
    if not step.isdigit():
        raise NanodrzError(f"{path}: malformed checkpoint metadata (step {step!r} is not a whole number)")
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise NanodrzError(f"{path}: tensor {bad} has NaN or infinite values (a corrupt or diverged checkpoint)")
    return metadata, tensors


def json_field(metadata: dict[str, str], key: str, kind: type, path: Path) -> Any:
    """A JSON value of the metadata, which must parse and be of `kind`."""
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        raise NanodrzError(f"{path}: malformed checkpoint metadata ({key!r} is missing or not JSON)") from None
    if not isinstance(value, kind):
        raise NanodrzError(f"{path}: malformed checkpoint metadata ({key!r} is not a JSON {kind.__name__})")
    return value


def load_state(path: Path, step: int) -> dict[str, Any]:
    """The training state beside weights `path`; an old pickled one is refused, never unpickled."""
    sidecar = state_path(path)
    if not sidecar.is_file():
        pickled = state_path(path, PICKLED_STATE_SUFFIX)
        if pickled.is_file():
            raise NanodrzError(
                f"{pickled}: a training state in the old pickle format, which nanodrz no longer opens (a pickle "
                f"can run code); if you trust its origin, convert it with: python scripts/convert-training-state.py "
                f"{pickled}")
        raise NanodrzError(f"{path}: no training state ({sidecar.name}) to resume from")
    metadata, tensors = read_safetensors(sidecar)
    if int(metadata["step"]) != step:
        raise NanodrzError(f"{sidecar}: training state does not belong to {path.name} (step mismatch)")
    try:
        state = unflatten_state(json_field(metadata, "state", dict, sidecar), tensors)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise NanodrzError(f"{sidecar}: malformed training state") from None
    for key in ("optimizer", "scheduler", "rng", "best_der"):
        if key not in state:
            raise NanodrzError(f"{sidecar}: malformed training state (no {key!r})")
    if not isinstance(state["best_der"], (int, float)) or math.isnan(state["best_der"]):
        raise NanodrzError(f"{sidecar}: malformed training state (best_der is not a number)")
    return state


def load_checkpoint(path: str | Path, with_state: bool = False) -> Checkpoint:
    path = weights_path(path)
    if not path.is_file():
        raise NanodrzError(f"no checkpoint at {path}")
    metadata, weights = read_safetensors(path)
    step = int(metadata["step"])
    config = json_field(metadata, "config", dict, path)
    tokenizer_spec = json_field(metadata, "tokenizer", dict, path)
    state = load_state(path, step) if with_state else None
    pipeline = None
    if "pipeline" in metadata:
        pipeline = PipelineParams.from_dict(json_field(metadata, "pipeline", dict, path), f"{path}: pipeline")
    return Checkpoint(weights, step, config, tokenizer_spec, state, pipeline)


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
