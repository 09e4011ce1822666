"""Fine-tuning on annotated recordings: does adapting the shipped model to one preset's conversations lower
DER on that preset's test set, without raising it on the other presets?

The "user's recordings" are one preset's conversations written by `nanodrz simulate` from train speakers
(audio + RTTM, exactly what a user brings); the test sets are every preset's conversations of test
speakers, which neither the shipped model nor the fine-tuning ever heard. Steps, each skipped when its
output exists (a stopped run continues where it stopped):

1. the recordings:  nanodrz simulate --preset PRESET --split train --num 200 --seed 21 --out WORK/recordings
2. the test sets:   nanodrz simulate --preset P --split test --num 12 --seed 0 --out WORK/test/P   (every P)
3. before:          nanodrz diarize WORK/test/P --out WORK/before/P, then nanodrz evaluate --json
4. fine-tuning:     nanodrz train WORK/finetune.yaml: the shipped model's own training config with
                    train.init_from = the shipped model, every weight trainable, a lower learning rate, and
                    data.recordings = {path: WORK/recordings, ratio: 0.5, validation_fraction: 0.1}
5. after:           the same as 3 with --model WORK/run/best.safetensors (lowest validation DER, which
                    includes the held-out recordings)
6. with --control MODEL (a model trained as long on simulated conversations alone): the same as 3, a
                    column that separates adaptation from further training
7. WORK/results.json and a Markdown table (--markdown): DER (collar 0, overlap scored) before and after.

A preset is a name or a YAML file (`benchmarks/presets/rapid.yaml`, outside the training curriculum); its
folders and rows are named by the file's stem.

The run (about an hour on 2 CPU cores; pass --threads 2 when nothing else runs):

    .venv/bin/python benchmarks/finetune_recordings.py --bank data/bank --preset overlap \\
        --work runs/finetune_overlap --markdown benchmarks/results/finetune_recordings.md

A smoke test (a minute; numbers mean nothing):

    .venv/bin/python benchmarks/finetune_recordings.py --bank data/bank --preset overlap --work /tmp/finetune_smoke \\
        --recordings 4 --test-files 1 --presets overlap,clean --steps 2 --batch-size 2 --validation-conversations 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from nanodrz.checkpoint import load_checkpoint
from nanodrz.params import PipelineParams
from nanodrz.pipeline import SHIPPED_MODEL


def nanodrz(*arguments: str | Path) -> None:
    """Run one `nanodrz` command; its own one-line error ends the benchmark."""
    command = [sys.executable, "-m", "nanodrz.cli", *map(str, arguments)]
    print("$ nanodrz " + " ".join(map(str, arguments)), flush=True)
    if subprocess.run(command).returncode != 0:
        sys.exit(f"failed: nanodrz {' '.join(map(str, arguments))}")


def simulate(preset: str, split: str, count: int, seed: int, out: Path, bank: str | None) -> None:
    if not (out / "manifest.json").is_file():
        nanodrz("simulate", "--preset", preset, "--split", split, "--num", count, "--seed", seed, "--out", out,
                *(["--bank", bank] if bank else []))


def der_of(references: Path, model: Path, out: Path, threads: int) -> float:
    """DER (collar 0) of `model` over a folder of recordings, diarized into `out` once."""
    scores = out.with_suffix(".json")
    if not scores.is_file():
        nanodrz("diarize", references, "--out", out, "--model", model, "--threads", threads)
        nanodrz("evaluate", "--ref", references, "--hyp", out, "--collar", "0", "--json", scores)
    return json.loads(scores.read_text())["total"]["der"][0]["der"]


def finetune_config(args: argparse.Namespace, model: Path, work: Path) -> dict:
    """The model's own training config, turned into a fine-tuning run on the recordings."""
    checkpoint = load_checkpoint(model)
    config = checkpoint.config
    config["data"].update(bank=args.bank, workers=1, recordings={
        "path": str(work / "recordings"), "ratio": args.ratio, "validation_fraction": 0.1, "seed": 0})
    validation = config["data"]["validation"]
    for key in ("max_triples", "eos_penalty"):  # written by nanodrz before validation took pipeline parameters
        validation.pop(key, None)
    config["train"].pop("activity_weight", None)  # the retired activity head's loss weight
    # Validate (and store in every checkpoint) the parameters the model is used with, so that "after" is
    # diarized as "before" was.
    validation.update(conversations=args.validation_conversations,
                      pipeline=(checkpoint.pipeline or PipelineParams()).to_dict())
    config["optim"].update(lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(20, args.steps), freeze_loaded=False)
    config["train"].update(steps=args.steps, batch_size=args.batch_size, init_from=str(model),
                           out_dir=str(work / "run"), eval_interval=max(1, args.steps // 4),
                           checkpoint_interval=max(1, args.steps // 4), log_interval=min(10, args.steps),
                           stop_at_step=None, max_minutes=None, device="cpu")
    return config


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    control = args.control is not None
    lines = ["# Fine-tuning on annotated recordings: `benchmarks/finetune_recordings.py`", "",
             f"The shipped model fine-tuned for {args.steps} steps (batch {args.batch_size}, peak lr {args.lr:g}) on "
             f"{args.recordings} `{args.preset}` conversations of train speakers written by `nanodrz simulate`, "
             f"mixed with simulated conversations at ratio {args.ratio:g}. Test sets: {args.test_files} "
             "conversations of test speakers per preset. DER % (collar 0, overlap scored)."
             + (f" Control: `{args.control}`, trained further on simulated conversations alone." if control else ""),
             "", "| preset | DER before | DER after | change |" + (" DER control |" if control else ""),
             "|---|---:|---:|---:|" + ("---:|" if control else "")]
    for row in rows:
        marker = " (adapted)" if row["preset"] == Path(args.preset).stem else ""
        lines.append(f"| {row['preset']}{marker} | {100 * row['before']:.1f} | {100 * row['after']:.1f} | "
                     f"{100 * (row['after'] - row['before']):+.1f} |"
                     + (f" {100 * row['control']:.1f} |" if control else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="overlap", help="the preset whose conversations are the recordings")
    parser.add_argument("--presets", default="clean,overlap,noisy,crowd,phone", help="test sets (comma-separated)")
    parser.add_argument("--work", type=Path, required=True, help="folder for recordings, test sets, run, scores")
    parser.add_argument("--bank", help="speech bank folder (default: nanodrz's)")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="model to fine-tune (default: shipped)")
    parser.add_argument("--recordings", type=int, default=200, help="conversations standing for the recordings")
    parser.add_argument("--test-files", type=int, default=12, help="test conversations per preset")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the fine-tuning")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of training examples from the recordings")
    parser.add_argument("--validation-conversations", type=int, default=8, help="per validation set")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of nanodrz diarize")
    parser.add_argument("--control", type=Path, help="also score this model (trained further without recordings)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    work, presets = args.work, args.presets.split(",")
    names = {preset: Path(preset).stem for preset in presets}  # as `nanodrz sweep` names preset rows

    simulate(args.preset, "train", args.recordings, 21, work / "recordings", args.bank)
    for preset in presets:
        simulate(preset, "test", args.test_files, 0, work / "test" / names[preset], args.bank)

    def ders(model: Path, stage: str) -> dict[str, float]:
        return {preset: der_of(work / "test" / names[preset], model, work / stage / names[preset], args.threads)
                for preset in presets}

    before = ders(args.model, "before")
    last, tuned = work / "run" / "last.safetensors", work / "run" / "best.safetensors"
    if not (last.is_file() and load_checkpoint(last).step >= args.steps):
        config_path = work / "finetune.yaml"
        config_path.write_text(yaml.safe_dump(finetune_config(args, args.model, work), sort_keys=False))
        nanodrz("train", config_path, *(["--resume", work / "run"] if last.is_file() else []))
    after = ders(tuned, "after")
    control = ders(args.control, "control") if args.control else {}
    rows = [{"preset": names[preset], "before": before[preset], "after": after[preset],
             **({"control": control[preset]} if control else {})} for preset in presets]
    (work / "results.json").write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                                   "rows": rows}, indent=1))
    table = to_markdown(rows, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
