"""Speech regions of single-speaker audio, for the utterance bank.

The WebRTC VAD decides per 10 ms frame; its built-in hangover keeps a region "on" for 100-150 ms
after speech ends, which would shift every reference turn end. An energy gate relative to the
loudest frame removes that tail on clean recordings (TTS silence is digital zero). Short pauses are
bridged (a pause inside a sentence is not a turn boundary) and blips are dropped.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

SAMPLE_RATE = 16000
FRAME_SECONDS = 0.01


def speech_regions(audio: np.ndarray, min_pause: float = 0.3, min_speech: float = 0.1,
                   aggressiveness: int = 2, gate_db: float = 50.0) -> np.ndarray:
    """(K, 2) start/end seconds of speech in 16 kHz mono float audio.

    Pauses shorter than `min_pause` are bridged, regions shorter than `min_speech` are dropped, and
    frames more than `gate_db` below the loudest 10 ms frame never count as speech.
    """
    frame = int(SAMPLE_RATE * FRAME_SECONDS)
    count = audio.size // frame
    if count == 0:
        return np.zeros((0, 2), dtype=np.float32)
    frames = np.asarray(audio[: count * frame], dtype=np.float32).reshape(count, frame)
    pcm = np.clip(np.round(frames * 32767.0), -32768, 32767).astype("<i2")
    vad = webrtcvad.Vad(aggressiveness)
    voiced = np.fromiter((vad.is_speech(row.tobytes(), SAMPLE_RATE) for row in pcm), dtype=bool, count=count)
    energy_db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    voiced &= energy_db > max(energy_db.max() - gate_db, -90.0)
    runs = _runs(voiced)
    if runs.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    merged = [list(runs[0])]
    for start, end in runs[1:]:
        if (start - merged[-1][1]) * FRAME_SECONDS < min_pause:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    regions = np.asarray(merged, dtype=np.float64) * FRAME_SECONDS
    regions = regions[regions[:, 1] - regions[:, 0] >= min_speech]
    return regions.astype(np.float32).reshape(-1, 2)


def _runs(mask: np.ndarray) -> np.ndarray:
    """(K, 2) [start, end) frame indices of the runs of True in `mask`."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1)


def trim_silence(audio: np.ndarray, regions: np.ndarray, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Cut leading and trailing silence to `margin` seconds around the speech; regions follow the cut."""
    if regions.shape[0] == 0:
        return audio, regions
    first = max(0, int((regions[0, 0] - margin) * SAMPLE_RATE))
    last = min(audio.size, int(np.ceil((regions[-1, 1] + margin) * SAMPLE_RATE)))
    return audio[first:last], (regions - np.float32(first / SAMPLE_RATE)).astype(np.float32)


def split_at_pauses(audio: np.ndarray, regions: np.ndarray, max_seconds: float,
                    margin: float = 0.1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a long recording into pieces of at most about `max_seconds`, only in the middle of pauses.

    A single region longer than `max_seconds` stays whole: cutting inside speech would make a false
    turn boundary. Each piece keeps up to `margin` seconds of silence at both ends.
    """
    if regions.shape[0] == 0 or audio.size <= max_seconds * SAMPLE_RATE:
        return [(audio, regions)]
    groups: list[list[int]] = [[0]]
    for index in range(1, regions.shape[0]):
        if regions[index, 1] - regions[groups[-1][0], 0] > max_seconds:
            groups.append([index])
        else:
            groups[-1].append(index)
    pieces = []
    for group in groups:
        part = regions[group[0]:group[-1] + 1]
        start = max(0.0, float(part[0, 0]) - margin)
        if group[0] > 0:
            start = max(start, float(regions[group[0] - 1, 1] + part[0, 0]) / 2)
        end = min(audio.size / SAMPLE_RATE, float(part[-1, 1]) + margin)
        if group[-1] + 1 < regions.shape[0]:
            end = min(end, float(part[-1, 1] + regions[group[-1] + 1, 0]) / 2)
        first, last = int(start * SAMPLE_RATE), int(np.ceil(end * SAMPLE_RATE))
        pieces.append((audio[first:last], (part - np.float32(first / SAMPLE_RATE)).astype(np.float32)))
    return pieces
