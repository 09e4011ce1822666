"""The report of `nanodrz sweep`: report.md's tables and one plot per group, all from results.json's content.

The first of the results' systems is ours (nanodrz); the others are baselines, shown in columns after it.
"""

from __future__ import annotations

import math
from pathlib import Path

from nanodrz.fileio import atomic_open
from nanodrz.sweep_runs import CONSISTENCY_WINDOW
from nanodrz.sweep_sets import MIN_LONG_FORM_FILES, SECONDS_PER_FILE


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, the first column left-aligned and the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def der_table(rows: list[dict], systems: list[str], first_column: str, measured: str | None) -> str:
    """Rows of an axis or of the sets group: our DER and its parts, JER, speaker counts, label consistency
    and speed, then each baseline's headline columns; `measured`: the column of what the sets really hold."""
    header = [first_column, "files", "audio min", "speech s", "overlap %", "speakers", *([measured] if measured else []),
              "DER %", "miss %", "FA %", "conf %", "DER % c0.25", "JER %", "#spk exact %", "label cons. %", "RTF"]
    for baseline in systems[1:]:
        header += [f"{baseline} DER %", f"{baseline} DER % c0.25", f"{baseline} #spk exact %",
                   f"{baseline} label cons. %", f"{baseline} RTF"]
    table = []
    for row in rows:
        ours = row["systems"][systems[0]]
        der0, der25 = ours["total"]["der"]
        cells = [row["name"], str(row["files"]), f"{row['audio_seconds'] / 60:.1f}", f"{row['speech_seconds']:.0f}",
                 percent(row["overlap_ratio"]), f"{row['mean_speakers']:.1f}",
                 *(["–" if row["measured"] is None else f"{row['measured']:.2f}"] if measured else []),
                 percent(der0["der"]), percent(der0["missed"]), percent(der0["false_alarm"]),
                 percent(der0["confusion"]), percent(der25["der"]), percent(ours["total"]["jer"]),
                 percent(ours["speaker_count_exact"]), percent(ours["label_consistency"]),
                 f"{ours['real_time_factor']:.3f}"]
        for baseline in systems[1:]:
            other = row["systems"][baseline]
            cells += [percent(other["total"]["der"][0]["der"]), percent(other["total"]["der"][1]["der"]),
                      percent(other["speaker_count_exact"]), percent(other["label_consistency"]),
                      f"{other['real_time_factor']:.3f}"]
        table.append(cells)
    return markdown(header, table)


def noise_table(rows: list[dict], systems: list[str]) -> str:
    """Rows of the noise group: false-alarm seconds per minute, speaker counts, DER where there is speech."""
    header = ["set", "files", "audio min", "speech s", "speakers"]
    for system in systems:
        prefix = "" if system == systems[0] else f"{system} "
        header += [f"{prefix}FA s/min", f"{prefix}DER %", f"{prefix}#spk exact %", f"{prefix}mean #spk", f"{prefix}RTF"]
    table = []
    for row in rows:
        cells = [row["name"], str(row["files"]), f"{row['audio_seconds'] / 60:.1f}", f"{row['speech_seconds']:.0f}",
                 f"{row['mean_speakers']:.1f}"]
        for system in systems:
            result = row["systems"][system]
            cells += [f"{result['false_alarm_per_minute']:.1f}",
                      percent(result["total"]["der"][0]["der"] if row["speech_seconds"] > 0 else None),
                      percent(result["speaker_count_exact"]), f"{result['mean_hypothesis_speakers']:.1f}",
                      f"{result['real_time_factor']:.3f}"]
        table.append(cells)
    return markdown(header, table)


def write_report(out: Path, results: dict) -> None:
    """report.md and plots/ in `out`."""
    from nanodrz.plots import plot_sweep_group  # matplotlib only when a report is written

    systems = results["systems"]
    lines = [
        "# nanodrz sweep",
        "",
        f"- model: `{results['model']}` (step {results['model_step']}), device {results['device']}, "
        f"batch size {results['batch_size']}, {results['torch_threads']} torch threads",
        f"- pipeline parameters: {pipeline_summary(results.get('pipeline', {}))}",
        f"- systems: {', '.join(systems)}",
        f"- simulated sets: bank `{results['bank']}`, split `{results['split']}`, seed {results['seed']}, "
        f"{results['per_point']} files per point (fewer for long recordings: about {results['per_point']} x "
        f"{SECONDS_PER_FILE:g} s of audio, at least {MIN_LONG_FORM_FILES} files)"
        + (", quick run (first and last points; 20 and 60 s for duration)" if results["quick"] else ""),
        f"- base conversation: preset `{results['base_preset']}` with " + ", ".join(f"`{o}`" for o in results["base_overrides"])
        + "; every axis changes one knob of it, and all points share the seed",
        "- DER = (missed + false alarm + confusion) / reference speech, accumulated over the files of a row; "
        "collar 0 unless marked c0.25 (0.25 s unscored each side of reference boundaries); overlapped speech "
        "scored; JER without collar. #spk exact: files with exactly the reference number of speakers. "
        f"label cons.: over files longer than {CONSISTENCY_WINDOW:g} s, the share of hypothesis speech whose label "
        f"maps to the same reference speaker in its {CONSISTENCY_WINDOW:g} s piece as over the whole file. "
        "RTF: processing seconds / audio seconds (model loading excluded, after one untimed warm-up file).",
    ]
    for group in results["groups"]:
        lines += ["", f"## {group['title']}", ""]
        if group.get("knob"):
            lines += [f"Knob: {group['knob']}.", ""]
        lines.append(noise_table(group["rows"], systems) if group["kind"] == "noise" else
                     der_table(group["rows"], systems, "point" if group["kind"] == "axis" else "set",
                                    group.get("measured")))
        notes = [f"{row['name']}: {row['note']}" for row in group["rows"] if row["note"]]
        notes += [f"{row['name']}: the same files as {row['systems'][systems[0]]['same_as']}, scores reused"
                  for row in group["rows"] if row["systems"][systems[0]]["same_as"]]
        notes += [f"{row['name']}: {system} failed on {len(row['systems'][system]['failed'])} file(s), scored as "
                  f"all missed" for row in group["rows"] for system in systems if row["systems"][system]["failed"]]
        if notes:
            lines += ["", *[f"- {note}" for note in notes]]
        lines += ["", f"![DER: {group['title']}]({group['plot']})"]
        plot_sweep_group(group, systems, out / group["plot"])
    with atomic_open(out / "report.md") as handle:
        handle.write("\n".join(lines) + "\n")


def pipeline_summary(pipeline: dict) -> str:
    """The parameters a reader compares runs by: `group.name value`, "off" for None."""
    shown = [("merge", "threshold"), ("refine", "passes"), ("decoding", "eos_penalty"), ("resegment", "speech_threshold"),
             ("resegment", "overlap_threshold"), ("resegment", "nonspeech_threshold")]
    values = [(f"{group}.{name}", pipeline.get(group, {}).get(name, "?")) for group, name in shown]
    return ", ".join(f"{key} {'off' if value is None else value}" for key, value in values)
