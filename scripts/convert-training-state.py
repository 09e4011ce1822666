"""Convert a training state written by older nanodrz (`NAME.state.pt`, a pickle) to `NAME.state.safetensors`.

`nanodrz train --resume` never opens pickles, because a pickle can run code. This script opens one
with torch's restricted loader (`weights_only=True`), which accepts tensors, plain containers and
numpy's random-generator state, and nothing that could execute; run it only on files you trust.

    python scripts/convert-training-state.py runs/x/last.state.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from nanodrz.checkpoint import STATE_SUFFIX, write_state

NUMPY_RNG_GLOBALS = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", type=Path, help="the old NAME.state.pt")
    args = parser.parse_args()
    if not args.state.name.endswith(".state.pt") or not args.state.is_file():
        print(f"convert-training-state: error: {args.state} is not an existing NAME.state.pt file", file=sys.stderr)
        return 2
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            state = torch.load(args.state, map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler refuses anything unexpected
        print(f"convert-training-state: error: {args.state}: refused ({str(error).splitlines()[0]})", file=sys.stderr)
        return 2
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        print(f"convert-training-state: error: {args.state}: not a nanodrz training state", file=sys.stderr)
        return 2
    step = state.pop("step")
    state.pop("format", None)
    state.pop("version", None)
    target = args.state.with_name(args.state.name[: -len(".state.pt")] + STATE_SUFFIX)
    write_state(target, step, state)
    print(f"wrote {target}; resume as before, and delete {args.state} when done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
