"""Write the model a training config describes, initialised from its `train.init_from` checkpoint, untrained.

This is step 0 of that config's run: the tensors that fit are copied and the new parts keep their starting
values. The shipped model is `configs/small_span.yaml` at step 0 (see MODEL_CARD.md: training it further
lowered the validation loss but raised the greedy validation DER).

    .venv/bin/python scripts/grow-model.py configs/small_span.yaml src/nanodrz/models/default.safetensors
"""

from __future__ import annotations

import sys

import torch

from nanodrz.checkpoint import load_checkpoint, save_checkpoint
from nanodrz.config import load_config, to_dict
from nanodrz.errors import NanodrzError
from nanodrz.model import DiarizationModel
from nanodrz.tokenizer import Tokenizer
from nanodrz.run_state import initialise_from
from nanodrz.training_config import Config


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: grow-model.py CONFIG.yaml OUT.safetensors", file=sys.stderr)
        return 2
    try:
        config = load_config(Config, sys.argv[1], [])
        if not config.train.init_from:
            raise NanodrzError(f"{sys.argv[1]} has no train.init_from to grow from")
        torch.manual_seed(config.train.seed)
        model = DiarizationModel(config.model, Tokenizer(config.tokenizer))
        copied = initialise_from(model, load_checkpoint(config.train.init_from))
        save_checkpoint(sys.argv[2], model, 0, to_dict(config))
    except (NanodrzError, ValueError) as error:
        print(f"grow-model: {error}", file=sys.stderr)
        return 1
    print(f"grow-model: {len(copied)} of {len(model.state_dict())} tensors from {config.train.init_from} -> {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
