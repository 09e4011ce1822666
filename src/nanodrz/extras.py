"""The model's extras: span voices and the time pointer, which add to token inputs and logits, and the
overlap head, which reads the audio frames (see the module docstring of `model.py`).

Span voices and the time pointer keep state for one batch: the model starts one object per extra when it
reads a batch's audio; the object applies the extra's layers, carries the batch's state from token to
token, and is reordered with beams. The layers themselves are the model's own (`span_projection`,
`similarity_scale`, `similarity_threshold`, `pointer_query`, `pointer_key`: the names checkpoints store
them under, so they stay attributes of the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from nanodrz.model import DiarizationModel

SPEAKER_COUNT_CLASSES = 3  # none, one, two or more


@dataclass
class SpanVoices:
    """Span voices of one batch (`ModelConfig.span_voices`, and `voice_similarity`).

    At the end time and the label of every triple, the model's input gets the unit mean window embedding
    over the triple's span, projected. With it, the position that predicts a label already holds the voice
    it is labelling, and every earlier label holds its own voice next to its letter.

    With `voice_similarity`, the letter logits after each end time also get, for every letter in use,
    scale * (cosine - threshold): the cosine between the span's voice and the mean voice of the spans
    labelled with that letter so far (prompt triples included). Unused letters get 0. At the starting
    values (scale 20, threshold 0.75, the best threshold for nearest-centroid assignment on validation
    spans) this alone is online nearest-centroid clustering; both values train, and the transformer's own
    logits correct it (overlapped spans, short turns). Left to learn the comparison from zero-initialised
    inputs, the small model had not started to after 500 steps.

    State: the window embeddings `voices` (B, T, E) at `frame_seconds` (T,), the last two tokens `recent`
    (B, 2), and per letter the sum `letter_sums` (B, K, E) and count `letter_counts` (B, K) of the span
    voices labelled with it so far.
    """

    model: DiarizationModel
    voices: torch.Tensor
    frame_seconds: torch.Tensor
    recent: torch.Tensor
    letter_sums: torch.Tensor
    letter_counts: torch.Tensor

    @classmethod
    def start(cls, model: DiarizationModel, voices: torch.Tensor) -> SpanVoices:
        """Nothing written yet over window embeddings (B, T, E)."""
        batch, num_frames, size = voices.shape
        num_speakers = model.tokenizer.num_speakers
        return cls(model, voices, torch.arange(num_frames, device=voices.device) / model.config.frame_rate,
                   torch.full((batch, 2), model.tokenizer.PAD, dtype=torch.long, device=voices.device),
                   torch.zeros(batch, num_speakers, size, device=voices.device),
                   torch.zeros(batch, num_speakers, device=voices.device))

    def select(self, rows: torch.Tensor) -> SpanVoices:
        return SpanVoices(self.model, self.voices[rows], self.frame_seconds, self.recent[rows],
                          self.letter_sums[rows], self.letter_counts[rows])

    def rerank(self, rows: torch.Tensor) -> SpanVoices:
        """`select` for rows that stay within their input's beams, which share `voices`."""
        return SpanVoices(self.model, self.voices, self.frame_seconds, self.recent[rows],
                          self.letter_sums[rows], self.letter_counts[rows])

    def advance(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, N, d) inputs added to `tokens` (B, N), of which `lengths` are real, and (B, N, K) biases of
        the letter logits at each position (None without voice similarity); both None when no token ends
        or labels a span (as in a third of all steps: those that write a start time). The state moves past
        the tokens."""
        model, tok = self.model, self.model.tokenizer
        context = torch.cat([self.recent, tokens], dim=1)
        last_real = (lengths - 1).clamp(min=0)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.recent = torch.stack([context[rows, last_real + 1], context[rows, last_real + 2]], dim=1)
        is_time, seconds = model.token_is_time[context], model.token_seconds[context]
        current, last, before_last = (slice(2, None), slice(1, -1), slice(None, -2))
        is_end = is_time[:, current] & is_time[:, last]
        is_label = ~is_time[:, current] & (tokens > tok.PROMPT_END) & is_time[:, last] & is_time[:, before_last]
        has_span = is_end | is_label
        if not bool(has_span.any()):
            return None, None
        start = torch.where(is_end, seconds[:, last], seconds[:, before_last])
        end = torch.where(is_end, seconds[:, current], seconds[:, last])
        inside = ((self.frame_seconds >= start[..., None]) & (self.frame_seconds < end[..., None])
                  & has_span[..., None])
        pooled = F.normalize(torch.bmm(inside.to(self.voices.dtype), self.voices), dim=-1)
        if model.similarity_scale is None:
            return model.span_projection(pooled), None
        letters = torch.arange(tok.speaker_offset, tok.speaker_offset + tok.num_speakers, device=tokens.device)
        labelled = ((tokens[..., None] == letters) & is_label[..., None]).to(pooled.dtype)  # (B, N, K)
        sums = self.letter_sums[:, None] + (labelled[..., None] * pooled[:, :, None]).cumsum(1)  # (B, N, K, E)
        counts = self.letter_counts[:, None] + labelled.cumsum(1)
        cosine = (F.normalize(sums, dim=-1) * pooled[:, :, None]).sum(-1)
        in_use = (counts > 0) & is_end[..., None]
        bias = torch.where(in_use, model.similarity_scale * (cosine - model.similarity_threshold), 0.0)
        self.letter_sums, self.letter_counts = sums[rows, last_real], counts[rows, last_real]
        return model.span_projection(pooled), bias


@dataclass
class TimePointer:
    """The time pointer of one batch (`ModelConfig.time_pointer`): every time token's logit gets the
    scaled dot product of the writing position's query and the key of the audio frame at that time.

    State: `keys` (B, time tokens, d), the key of the frame each time token names, zero for times at or
    past an item's last real frame, which get nothing.
    """

    model: DiarizationModel
    keys: torch.Tensor

    @classmethod
    def start(cls, model: DiarizationModel, audio_hidden: torch.Tensor, frames: torch.Tensor) -> TimePointer:
        """The pointer over final audio states (B, T, d), of which `frames` (B,) are real."""
        time_frames = model.time_token_frames
        keys = model.pointer_key(audio_hidden)[:, time_frames.clamp(max=audio_hidden.shape[1] - 1)]
        return cls(model, keys * (time_frames < frames[:, None])[..., None].to(keys.dtype))

    def select(self, rows: torch.Tensor) -> TimePointer:
        return TimePointer(self.model, self.keys[rows])

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, time tokens) pointer scores of token positions with final states (B, N, d)."""
        return self.model.pointer_query(hidden) @ self.keys.transpose(1, 2) / math.sqrt(self.keys.shape[-1])


class SpeakerCountHead(nn.Module):
    """How many speakers talk in each audio frame (none, one, two or more), from the frame's input
    (front end) next to its final state, with two frames of context each side (a 5-tap convolution):
    the final states were trained to serve the tokens and may drop acoustic detail an overlap shows.
    Each of `layers` - 1 further residual 5-tap convolutions, dilated 2, 4, ..., doubles the context
    that reaches a frame's answer (3 layers: 14 frames, 0.56 s, each side)."""

    def __init__(self, d_model: int, layers: int = 1):
        super().__init__()
        self.mix = nn.Conv1d(2 * d_model, d_model, kernel_size=5, padding=2)
        self.context = nn.ModuleList(nn.Conv1d(d_model, d_model, kernel_size=5, padding=2 * 2 ** i, dilation=2 ** i)
                                     for i in range(1, layers))
        self.out = nn.Linear(d_model, SPEAKER_COUNT_CLASSES)

    def forward(self, audio_x: torch.Tensor, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3) logits from (B, T, d) inputs and final states of which `frames` (B,) are real; padding
        is zeroed first (and after every layer), so an item's logits do not depend on its batch."""
        real = (torch.arange(audio_x.shape[1], device=audio_x.device) < frames[:, None])[:, None, :]
        x = torch.cat([audio_x, hidden.to(audio_x.dtype)], dim=-1).transpose(1, 2) * real
        x = F.gelu(self.mix(x)) * real
        for layer in self.context:
            x = x + F.gelu(layer(x)) * real
        return self.out(x.transpose(1, 2))
