"""Where two `nanodrz sweep` runs on the same files differ, file by file: is a change of DER a speaker split
or merged (the known instability of speaker-count decisions) or lost speech (a real loss)?

For every row of both runs' results.json (presets, annotated sets, the noise group), each file's DER (collar
0, overlap scored) under run A and run B, split into missed speech, false alarm and confusion, and the number
of speakers each run found. A file counts as changed when its DER moves by more than `--min-change` points;
a change is "labels" when confusion carries most of it (speech found alike, speakers assigned differently),
"speech" otherwise. The references are read from run B's sets (`nanodrz sweep` writes them under
OUT/sets/), so both runs must have been made on the same files (same bank, seed and size); an annotated set
added with `nanodrz sweep --extra` is read from the RTTM folder `--extra NAME=DIR` names.

    .venv/bin/python benchmarks/compare_sweeps.py benchmarks/results/v2_before_input_encoder \\
        benchmarks/results/v2_input_encoder --markdown benchmarks/results/input_encoder_files.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanodrz.annotation import read_rttm
from nanodrz.evaluate import score
from nanodrz.fileio import atomic_open


def rows_of(run: Path) -> dict[str, tuple[str, dict]]:
    """Row name -> (group name, row) of a sweep's results.json."""
    results = json.loads((run / "results.json").read_text())
    return {row["name"]: (group["name"], row) for group in results["groups"] for row in group["rows"]}


def file_scores(references: dict, hypotheses: dict) -> dict[str, tuple[float, float, float, float, int]]:
    """uri -> (DER, missed, false alarm, confusion) in % of the file's reference speech, speakers found."""
    found = {}
    for uri, reference in references.items():
        hypothesis = hypotheses.get(uri, [])
        at = score({uri: reference}, {uri: hypothesis}, collars=(0.0,)).total.at(0.0)
        found[uri] = (100 * at.der, 100 * at.rate(at.missed), 100 * at.rate(at.false_alarm),
                      100 * at.rate(at.confusion), len({turn.speaker for turn in hypothesis}))
    return found


def compare(run_a: Path, run_b: Path, min_change: float, extra: dict[str, Path]) -> list[str]:
    rows_a, rows_b = rows_of(run_a), rows_of(run_b)
    lines = ["# Two sweeps file by file: `benchmarks/compare_sweeps.py`", "",
             f"A: `{run_a}`; B: `{run_b}`. DER % at collar 0, overlap scored, per file; miss / FA / conf in % of "
             f"the file's reference speech; spk: speakers found. Files listed where DER moves "
             f"by more than {min_change:g} points; `labels`: confusion carries most of the change (a speaker split, "
             "merged or swapped), `speech`: missed or false-alarm speech does.", "",
             "| row | files | DER A | DER B | changed files | labels | speech | count changed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    details = []
    for name, (group, row_b) in rows_b.items():
        if name not in rows_a or row_b["speech_seconds"] <= 0:
            continue
        sets = extra.get(name, run_b / "sets" / group / name)
        references = {}
        for path in sorted(sets.glob("*.rttm")):
            references.update(read_rttm(path))
        if not references:
            continue
        hypotheses = [read_rttm(run / rows[name][1]["systems"]["nanodrz"]["hypotheses"])
                      for run, rows in ((run_a, rows_a), (run_b, rows_b))]
        a, b = (file_scores(references, h) for h in hypotheses)
        changed = [uri for uri in references if abs(b[uri][0] - a[uri][0]) > min_change]
        labels = [uri for uri in changed if abs(b[uri][3] - a[uri][3]) >= abs(b[uri][0] - a[uri][0]) / 2]
        counts = [uri for uri in references if a[uri][4] != b[uri][4]]
        der = [100 * row["systems"]["nanodrz"]["total"]["der"][0]["der"] for row in (rows_a[name][1], row_b)]
        lines.append(f"| {name} | {len(references)} | {der[0]:.1f} | {der[1]:.1f} | {len(changed)} | {len(labels)} | "
                     f"{len(changed) - len(labels)} | {len(counts)} |")
        for uri in changed:
            speakers = len({turn.speaker for turn in references[uri]})
            details.append(f"| {name} | {uri} | " + " | ".join(
                f"{s[0]:.1f} ({s[1]:.1f} / {s[2]:.1f} / {s[3]:.1f}), {s[4]} spk" for s in (a[uri], b[uri]))
                + f" | {speakers} | {'labels' if uri in labels else 'speech'} |")
    lines += ["", "## Changed files", "",
              "| row | file | A: DER (miss / FA / conf), spk | B: DER (miss / FA / conf), spk | reference spk | kind |",
              "|---|---|---|---|---:|---|"] + details
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path, help="sweep output folder (before)")
    parser.add_argument("run_b", type=Path, help="sweep output folder (after), holding the sets")
    parser.add_argument("--min-change", type=float, default=2.0, help="points of a file's DER that count as a change")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                        help="RTTM folder of an annotated set the sweeps added with --extra (repeatable)")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if any("=" not in item for item in args.extra):
        sys.exit("compare_sweeps: --extra takes NAME=DIR, e.g. pyannote-sample=data/pyannote-sample")
    extra = {name: Path(folder) for name, folder in (item.split("=", 1) for item in args.extra)}
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            sys.exit(f"compare_sweeps: {run}/results.json not found (a `nanodrz sweep --out` folder)")
    text = "\n".join(compare(args.run_a, args.run_b, args.min_change, extra)) + "\n"
    print(text)
    if args.markdown:
        with atomic_open(args.markdown) as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
