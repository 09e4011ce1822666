"""The offline reference system nanodrz is compared with: senko's clustering diarizer.

senko (silero VAD, CAM++ speaker embeddings, spectral clustering) ships its weights inside the
wheel, so it runs with no network. It is a dependency anyway (nanodrz's `campplus` front end uses its
CAM++ model); its pipeline is imported only when a `SenkoBaseline` is built.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nanodrz.annotation import Turn, sort_turns
from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.errors import NanodrzError


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """senko sets torch's global thread count to all cores; give the caller's setting back."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SenkoBaseline:
    """Diarize 16 kHz speech with senko; returns nanodrz `Turn`s labelled SPEAKER_01, SPEAKER_02, ..."""

    def __init__(self, device: str = "cpu"):
        try:
            import senko
        except ImportError:
            raise NanodrzError("senko is not installed: pip install senko==0.2.2") from None
        with _keep_torch_threads():
            # senko's warm-up mostly JIT-compiles UMAP+HDBSCAN (about a minute on CPU), which it uses only on
            # recordings over 20 minutes; those pay the compile on first use instead.
            self.diarizer = senko.Diarizer(device=device, warmup=False, quiet=True)

    def __call__(self, audio: str | Path | np.ndarray) -> list[Turn]:
        """Turns of a recording given as a path (any format, any rate) or a 16 kHz mono float array."""
        if isinstance(audio, (str, Path)):
            audio = load_audio(audio, SAMPLE_RATE)
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise NanodrzError(f"expected mono audio (one dimension), got shape {audio.shape}")
        if not np.all(np.isfinite(audio)):
            raise NanodrzError("audio has NaN or infinite samples")
        with _keep_torch_threads():
            # senko rejects float samples outside [-1, 1], which resampling can produce.
            result = self.diarizer.diarize_samples(np.clip(audio, -1.0, 1.0), sample_rate=SAMPLE_RATE)
        if result is None:
            return []
        return sort_turns(
            Turn(float(segment["start"]), float(segment["end"]), segment["speaker"])
            for segment in result["merged_segments"]
        )


def measure_real_time_factor(
    diarize: Callable[[np.ndarray], list[Turn]],
    audio: np.ndarray,
    repeats: int = 3,
    sample_rate: int = SAMPLE_RATE,
) -> float:
    """Processing seconds per second of audio: the median of `repeats` timed runs after one untimed one.

    Below 1 is faster than real time; 1 / RTF is the "x real time" speed-up. The untimed run keeps
    one-off costs (lazy imports, JIT, allocator warm-up) out of the figure.
    """
    if repeats < 1:
        raise NanodrzError(f"repeats must be >= 1, got {repeats}")
    duration = len(audio) / sample_rate
    if duration <= 0:
        raise NanodrzError("cannot measure a real-time factor on empty audio")
    diarize(audio)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        diarize(audio)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) / duration
