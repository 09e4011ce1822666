"""DER with the speaker count found by the pipeline against the count given (`--num-speakers`), on the same
files: a user who knows how many people talk should never get a worse answer for saying so.

Each folder is a set of WAV files with RTTM references beside them (`nanodrz simulate`, the sweep's sets,
`benchmarks/validation_sets.sh`). Every recording is diarized twice by the shipped pipeline (or
`--model`): as `nanodrz diarize FILE` and as `nanodrz diarize FILE --num-speakers K`, K being the number
of speakers in its reference. Reported per set: DER % at collar 0 with overlap scored, and the share of
recordings whose output has exactly K speakers.

    .venv/bin/python benchmarks/speaker_count.py data/validation_sets/{ambient,clean,crowd,noisy,overlap,phone} \\
        [--model PATH] [--threads 1] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanodrz.evaluate import load_turns, score
from nanodrz.params import DiarizationSettings
from nanodrz.pipeline import Diarizer


def measure(diarizer: Diarizer, folder: Path) -> dict[str, float]:
    references, found, given = {}, {}, {}
    exact = {"found": 0, "given": 0}
    for rttm in tqdm(sorted(folder.glob("*.rttm")), desc=folder.name, unit="file", file=sys.stderr):
        wav = rttm.with_suffix(".wav")
        uri = wav.stem
        reference = load_turns(rttm, "reference").get(uri, [])
        references[uri] = reference
        count = len({t.speaker for t in reference})
        found[uri] = list(diarizer.run(wav, uri=uri).turns)
        given[uri] = list(diarizer.run(wav, DiarizationSettings(num_speakers=max(count, 1)), uri=uri).turns)
        exact["found"] += len({t.speaker for t in found[uri]}) == count
        exact["given"] += len({t.speaker for t in given[uri]}) == count
    files = len(references)
    if not files:
        raise SystemExit(f"no RTTM references in {folder}")
    return {"files": files,
            "der_found": 100 * score(references, found, collars=(0.0,)).total.at(0.0).der,
            "der_given": 100 * score(references, given, collars=(0.0,)).total.at(0.0).der,
            "exact_found": 100 * exact["found"] / files, "exact_given": 100 * exact["given"] / files}


def report(rows: dict[str, dict[str, float]], command: str, seconds: float) -> str:
    lines = ["# Speaker count found against given", "", "Written by `benchmarks/speaker_count.py`:", "",
             f"    {command}", "",
             "DER % at collar 0, overlap scored; `exact`: % of recordings whose output has the reference's "
             f"number of speakers. {seconds:.0f} s in all.", "",
             "| set | files | DER, count found | DER, count given | exact, found | exact, given |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['files']} | {row['der_found']:.2f} | {row['der_given']:.2f} | "
                     f"{row['exact_found']:.0f} | {row['exact_given']:.0f} |")
    mean = {key: sum(row[key] for row in rows.values()) / len(rows) for key in ("der_found", "der_given")}
    lines.append(f"| mean of sets | | {mean['der_found']:.2f} | {mean['der_given']:.2f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sets: folders of WAV files with RTTM references")
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the decoder (default 1)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diarizer = Diarizer.from_pretrained(args.model)
    start = time.perf_counter()
    rows = {}
    for folder in args.folders:
        name = folder.name if folder.name not in rows else str(folder)
        rows[name] = measure(diarizer, folder)
    text = report(rows, " ".join(["benchmarks/speaker_count.py", *sys.argv[1:]]), time.perf_counter() - start)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
