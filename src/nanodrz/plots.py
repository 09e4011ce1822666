"""Pictures that say more than tables: speaker timelines of one or more annotations of a recording, and
the DER curves of `nanodrz sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanodrz.annotation import Turn  # noqa: E402
from nanodrz.fileio import atomic_path  # noqa: E402


def plot_timeline(rows: dict[str, Sequence[Turn]], path: str | Path, title: str = "") -> None:
    """One panel per annotation (e.g. reference and hypothesis), one lane per speaker, saved as PNG."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.2 + 0.45 * sum(
        max(1, len({t.speaker for t in turns})) for turns in rows.values())), squeeze=False, sharex=True)
    palette = plt.get_cmap("tab10")
    end = max((t.end for turns in rows.values() for t in turns), default=1.0)
    for axis, (name, turns) in zip(axes[:, 0], rows.items()):
        speakers = sorted({t.speaker for t in turns})
        for lane, speaker in enumerate(speakers):
            spans = [(t.start, t.end - t.start) for t in turns if t.speaker == speaker]
            axis.broken_barh(spans, (lane - 0.4, 0.8), color=palette(lane % 10))
        axis.set_yticks(range(len(speakers)), speakers)
        axis.set_ylim(-0.6, max(len(speakers), 1) - 0.4)
        axis.set_xlim(0, end)
        axis.set_ylabel(name)
        axis.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_sweep_group(group: dict, systems: list[str], path: Path) -> None:
    """DER of every system along one group of `nanodrz sweep` (a results.json group): against the axis points
    (collar 0 solid, 0.25 dashed), or as bars per set; false alarm per minute for the noise group."""
    rows = group["rows"]
    labels = [row["name"] for row in rows]
    fig, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2) + 2.0, 3.6))
    palette = plt.get_cmap("tab10")
    for index, system in enumerate(systems):
        der0 = [100 * row["systems"][system]["total"]["der"][0]["der"] for row in rows]
        der25 = [100 * row["systems"][system]["total"]["der"][1]["der"] for row in rows]
        if group["kind"] == "noise":
            der0 = [row["systems"][system]["false_alarm_per_minute"] for row in rows]
        if group["kind"] == "axis":
            axis.plot(labels, der0, "o-", color=palette(index), label=f"{system} (collar 0)")
            axis.plot(labels, der25, "o--", color=palette(index), alpha=0.6, label=f"{system} (collar 0.25 s)")
        else:
            width = 0.8 / len(systems)
            positions = [i + (index - (len(systems) - 1) / 2) * width for i in range(len(rows))]
            axis.bar(positions, der0, width, color=palette(index), label=f"{system} (collar 0)")
            axis.set_xticks(range(len(rows)), labels)
    axis.set_xlabel(group["title"])
    axis.set_ylabel("false alarm s/min" if group["kind"] == "noise" else "DER %")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.set_title(f"{'False alarm' if group['kind'] == 'noise' else 'DER'}: {group['title'].lower()}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
