"""Audio in: any file soundfile reads, any sample rate, mixed down to 16 kHz mono float32.

Errors are one-line `NanodrzError`s naming the file, because `diarize` reports them per file and
moves on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from nanodrz.errors import NanodrzError

SAMPLE_RATE = 16000


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a (samples, channels) array; pass mono through."""
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling (libsoxr) of a mono float32 signal."""
    if source_rate == target_rate or audio.size == 0:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return np.ascontiguousarray(soxr.resample(audio, source_rate, target_rate, quality="HQ"), dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read `path` as mono float32 at `sample_rate`; unreadable or corrupt files raise NanodrzError."""
    path = Path(path)
    if not path.exists():
        raise NanodrzError(f"{path}: no such file")
    if path.is_dir():
        raise NanodrzError(f"{path}: is a directory, not an audio file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NanodrzError(f"{path}: cannot read audio ({reason})") from None
    return resample(to_mono(np.asarray(audio, dtype=np.float32)), rate, sample_rate)


def normalize_level(audio: np.ndarray, target_dbfs: float = -23.0, peak_limit: float = 0.99) -> np.ndarray:
    """Scale to a target RMS level (dBFS) measured over the louder half of 20 ms frames.

    Measuring over loud frames, not the whole signal, keeps the level independent of how much
    silence an utterance carries. The gain is reduced if it would clip.
    """
    if audio.size == 0:
        return audio.astype(np.float32)
    frame = 320
    usable = audio[: audio.size // frame * frame].reshape(-1, frame) if audio.size >= frame else audio[None]
    energies = np.mean(usable.astype(np.float64) ** 2, axis=1)
    loud = np.sort(energies)[len(energies) // 2:]
    rms = float(np.sqrt(loud.mean())) if loud.size else 0.0
    if rms <= 1e-8:
        return audio.astype(np.float32)
    gain = 10 ** (target_dbfs / 20) / rms
    peak = float(np.max(np.abs(audio)))
    if peak * gain > peak_limit:
        gain = peak_limit / peak
    return (audio * gain).astype(np.float32)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit PCM WAV (or FLAC/OGG by extension) atomically."""
    from nanodrz.fileio import atomic_path

    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}.get(path.suffix.lower())
    if fmt is None:
        raise NanodrzError(f"{path}: unsupported output extension (use .wav, .flac or .ogg)")
    subtype = "PCM_16" if fmt in ("WAV", "FLAC") else "VORBIS"
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)


def waveform_audio(name: str, waveform: object, sample_rate: object) -> np.ndarray:
    """pyannote's in-memory audio (a torch tensor or array of (channels, samples) or (samples,) at
    `sample_rate`) as 16 kHz mono float32, so such callers need not convert it themselves."""
    if hasattr(waveform, "detach"):  # a torch tensor, on any device
        waveform = waveform.detach().cpu().float().numpy()
    try:
        array = np.asarray(waveform, dtype=np.float32)
    except (TypeError, ValueError):
        raise NanodrzError(f"{name}: 'waveform' is not an array of samples") from None
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[0] > array.shape[1]):
        raise NanodrzError(f"{name}: 'waveform' must be (channels, samples) or (samples,), got shape {array.shape}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise NanodrzError(f"{name}: 'sample_rate' must be a positive whole number of Hz, got {sample_rate!r}")
    mono = array.mean(axis=0) if array.ndim == 2 else array
    return resample(mono, int(sample_rate))
