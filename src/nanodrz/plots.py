"""Pictures that say more than tables: speaker timelines of one or more annotations of a recording."""

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
