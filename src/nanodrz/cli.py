"""The `nanodrz` command: a thin layer that dispatches to one module per stage.

Each command module provides `add_arguments(parser)` and `run(args) -> int`. A `NanodrzError`,
or an `OSError` from the system (a full disk, a permission), becomes one line on stderr and exit
status 2; nothing a user can cause ends in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanodrz import __version__
from nanodrz.errors import NanodrzError

COMMANDS = {
    "prepare": ("nanodrz.prepare", "build the utterance bank from the offline speech sources"),
    "simulate": ("nanodrz.simulate", "write synthetic conversations (audio + RTTM + manifest)"),
    "evaluate": ("nanodrz.evaluate", "score hypotheses against references: DER and JER"),
    "train": ("nanodrz.train", "train a model from a YAML config"),
    "diarize": ("nanodrz.diarize", "diarize recordings: RTTM / JSON / timeline plots"),
    "sweep": ("nanodrz.sweep", "difficulty study: DER along each axis, optionally against senko"),
    "tune": ("nanodrz.tune", "choose the pipeline's parameters on validation sets with Optuna"),
    "ray": ("nanodrz.ray_jobs", "diarize many files over a Ray cluster, resumably, with a manifest"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanodrz", description="Speaker diarization as sequence generation.")
    parser.add_argument("--version", action="version", version=f"nanodrz {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except NanodrzError as error:
        print(f"nanodrz {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a lost mount, a permission: the system's own one-line reason
        print(f"nanodrz {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanodrz {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
