"""Audio front ends: raw 16 kHz samples in, one d_model vector per audio position out.

Features are computed in torch, inside the model, on the model's device: training workers only
mix audio, and inference needs no separate feature step. Front ends are looked up by name
(`FRONT_ENDS`), so another one (e.g. a pretrained speech encoder) can be swapped in through the config.

Every front end is exactly invariant to batch padding: an item gives the same vectors alone as it
does next to a longer one. The log-mel is computed per item at its true length, and after every conv
layer the positions past an item's length are zeroed, so a kernel reaching past the end reads the
same zeros as a conv's own zero padding would.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodrz.audio import SAMPLE_RATE


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


FRONT_ENDS = {"mel": MelFrontEnd}
