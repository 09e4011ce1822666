"""RTTMs of every set folder with a model's own pipeline, for checking that a change of code leaves the
answers byte for byte the same (run it on the old and the new tree, then `diff -r`).

    .venv/bin/python benchmarks/diarize_sets.py data/validation_sets OUT [--model M] [--param KEY=VALUE ...]
    PYTHONPATH=OLD_TREE/src .venv/bin/python benchmarks/diarize_sets.py data/validation_sets OUT_OLD

The refactor into `params`/`postprocess`/`longform`/`pipeline` was checked so: all 112 RTTMs of the
validation sets identical to those of commit b10f656 (model v1, its parameters of the time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nanodrz.annotation import format_rttm
from nanodrz.pipeline import Diarizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    diarizer = Diarizer.from_pretrained(args.model)
    if args.param:
        from nanodrz.commandline import parameter_value

        changes = {key: parameter_value(value) for key, _, value in (item.partition("=") for item in args.param)}
        diarizer.params = diarizer.params.with_values(changes)
    for folder in sorted(path for path in args.sets.iterdir() if path.is_dir()):
        recordings = [(wav.stem, str(wav)) for wav in sorted(folder.glob("*.wav"))]
        (args.out / folder.name).mkdir(parents=True, exist_ok=True)
        for name, turns in diarizer.diarize_many(recordings):
            (args.out / folder.name / f"{name}.rttm").write_text(format_rttm(turns, name))
        print(folder.name, flush=True)


if __name__ == "__main__":
    main()
