"""What a run carries between sessions besides weights and optimizer: random states, stop signals, and the
checks and copying that start a run from another one's checkpoint.
"""

from __future__ import annotations

import random
import signal
import threading
from typing import Any

import numpy as np
import torch

from nanodrz.checkpoint import Checkpoint, check_tokenizer
from nanodrz.config import from_dict, to_dict
from nanodrz.errors import ConfigError, NanodrzError
from nanodrz.model import DiarizationModel, ModelConfig
from nanodrz.tokenizer import TokenizerConfig
from nanodrz.training_config import Config


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
        except ConfigError:
            saved = None
        if saved != to_dict(getattr(config, section)):
            raise NanodrzError(f"cannot resume: the checkpoint's {section} config differs from this config's")
