"""Stable decisions: DER and speaker counts under small numeric changes of the frozen encoders.

The sets (folders of WAV + RTTM; validation speakers for choosing, test speakers for reporting) are decoded
under three conditions, each with the model's own pipeline parameters:
- `bf16`: as shipped (CAM++ in bfloat16 where the CPU runs it natively);
- `fp32`: CAM++ in float32;
- `once`: `long_form.encode_once`, the frozen encoders once per chunk (features from a different context).
Per set: DER % (collar 0, overlap scored) per condition, its change from `bf16`, the files whose number of
speakers changed, and the largest change of one file's DER. The issue's target: the same DER within 0.5
points per set. Decoded sets are kept in `--cache` (shared with `nanodrz tune`).

    .venv/bin/python benchmarks/stability.py data/validation_sets --cache data/tune_cache \\
        --markdown benchmarks/results/stability_validation.md [--model M] [--robust-trials 120]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from nanodrz.evaluate import score
from nanodrz.fileio import atomic_open
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.pipeline import Diarizer
from nanodrz.tune import decode_sets, read_sets, tune

CONDITIONS = ("bf16", "fp32", "once")


def per_file(found: dict, params: PipelineParams) -> dict[str, dict[str, tuple[float, int, int]]]:
    """set -> file -> (DER %, speakers found, speakers in the reference)."""
    result: dict[str, dict[str, tuple[float, int, int]]] = {}
    for set_name, recordings in found.items():
        for recording in recordings:
            turns = recording.outputs.finish(params, DiarizationSettings())[0]
            der = 100 * score({"x": recording.reference}, {"x": turns}, collars=(0.0,)).total.at(0.0).der
            result.setdefault(set_name, {})[recording.name] = (der, len({t.speaker for t in turns}),
                                                               len({t.speaker for t in recording.reference}))
    return result


def set_der(recordings: list, params: PipelineParams) -> float:
    references = {r.name: r.reference for r in recordings}
    hypotheses = {r.name: r.outputs.finish(params, DiarizationSettings())[0] for r in recordings}
    return 100 * score(references, hypotheses, collars=(0.0,)).total.at(0.0).der


def table(found: dict[str, dict], params: PipelineParams, title: str) -> list[str]:
    """The stability table of `params` over the decoded sets of every condition."""
    names = sorted(found["bf16"])
    measured = {c: {name: set_der(found[c][name], params) for name in names} for c in CONDITIONS}
    files = {c: per_file(found[c], params) for c in CONDITIONS}
    lines = [f"## {title}", "",
             "| set | bf16 | fp32 | Δ | count changed | largest swing | once | Δ | count changed | largest swing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        cells = [f"{measured['bf16'][name]:.1f}"]
        for condition in ("fp32", "once"):
            base, other = files["bf16"][name], files[condition][name]
            changed = sum(base[f][1] != other[f][1] for f in base)
            swing = max(abs(other[f][0] - base[f][0]) for f in base)
            cells += [f"{measured[condition][name]:.1f}", f"{measured[condition][name] - measured['bf16'][name]:+.1f}",
                      f"{changed}/{len(base)}", f"{swing:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    means = {c: float(np.mean(list(measured[c].values()))) for c in CONDITIONS}
    worst = {c: max(abs(measured[c][n] - measured["bf16"][n]) for n in names) for c in ("fp32", "once")}
    return lines + ["", "Mean DER: " + ", ".join(f"{c} {means[c]:.2f}" for c in CONDITIONS) + "; largest change of a "
                    "set's DER from bf16: " + ", ".join(f"{c} {worst[c]:.1f}" for c in worst) + ".", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--robust-trials", type=int, default=0,
                        help="also tune the post-processing (Optuna, this many trials) on the mean DER of the bf16 "
                             "and fp32 decodes together, and show its table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = read_sets(args.sets)
    found: dict[str, dict] = {}
    params = None
    for condition in CONDITIONS:
        diarizer = Diarizer.from_pretrained(args.model)
        params = params or diarizer.params  # the model's own, before this condition changes them
        diarizer.model.front_end.bf16 = condition != "fp32"
        diarizer.params = diarizer.params.with_values({"long_form.encode_once": condition == "once"})
        print(f"condition {condition}", file=sys.stderr)
        decoded = decode_sets(diarizer, sets, args.batch_size, args.cache)
        found[condition] = {name: recordings for name, recordings in decoded.items()
                            if any(r.reference for r in recordings)}
    lines = ["# Stability of decisions: `benchmarks/stability.py`", "",
             f"Sets under `{args.sets}`, model `{args.model or 'shipped'}`. DER % at collar 0, overlap scored. "
             "`count changed`: files whose number of speakers differs from `bf16`; `largest swing`: the largest "
             "change of one file's DER from `bf16`.", ""]
    lines += table(found, params, "The model's own pipeline parameters")
    if args.robust_trials:
        merged = {f"{c}/{name}": recordings for c in ("bf16", "fp32") for name, recordings in found[c].items()}
        robust, _ = tune(merged, params, set(), args.robust_trials, 0, 1.0, {"resegment.nonspeech_threshold"})
        lines += table(found, robust, f"Parameters tuned on the bf16 and fp32 decodes together "
                                      f"({args.robust_trials} trials, from the model's own)")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with atomic_open(args.markdown) as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
