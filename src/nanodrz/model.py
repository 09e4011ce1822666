"""The diarization model: an audio front end and a decoder-only transformer that writes turn tokens.

One sequence per example: audio positions (from the front end), then tokens
(START, prompt triples, PROMPT_END, answer triples, EOS; see `tokenizer.py`).

* Attention is prefix-LM by default: audio positions see all audio (bidirectional, as an encoder
  would), tokens see all audio and the tokens before them. `attention: causal` makes the audio causal
  too (the original prototype's choice), for comparison.
* Positions are rotary (RoPE) on explicit per-item position ids: audio frame i is at i, token j at
  (number of audio frames of that item) + j. Batches are padded, but every item sees exactly the
  relative positions it would see alone, and padded slots are masked as keys, so padding never
  changes a result. `rope_fraction` < 1 rotates only part of each head, leaving the rest free to
  match content across any distance (a token looking up the frames at the time it names, below).
* Time tokens know where they point (`time_embedding: true`): the embedding of time token k is a
  learned vector plus P(k * resolution), where P(t) is a learned projection of a sinusoid of t seconds;
  audio frame i gets P(i / frame_rate) added. A time token and the frames at that time therefore start
  out similar, and because the output layer is tied to the same table, writing a time is a lookup of
  frames at that time.
* `time_pointer: true` adds to every time token's logit a pointer score: the match between the
  writing position's query and the final state of the audio frame at that time (attention-style,
  content against content). The tied output layer can only say *where* by reproducing a position
  code; the pointer lets a frame that sounds like a turn boundary vote for itself. The query starts at
  zero, so a model grown by it starts as the same function.
* Generation uses a KV cache: the prefix (audio + prompt tokens) is run once, then one token per step.
* `activity_head: true` adds a linear read-out of every audio position's final state: which speaker
  letters are talking in that frame (letters in order of first appearance, the tokens' own lettering, so
  there is no permutation to search, as in Sortformer). Trained with a frame-level loss next to the
  token loss, it gives hundreds of dense targets per example where the tokens give a few dozen, and it
  ties each frame's state to the letters the decoder will write about it.
* `overlap_head: true` adds a small read-out of every audio position's input and final state
  (`SpeakerCountHead`): how many speakers talk in that frame (none, one, two or more), one class per frame as in powerset
  segmentation; `overlap_head_layers` > 1 widens its view with dilated convolutions. Long-form inference uses it to find overlapped speech the decoder did not write
  (`overlap.add_missed_overlap`); grown onto a trained model with the rest frozen, it costs no change
  to what the decoder writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodrz.features import FRONT_ENDS
from nanodrz.tokenizer import Tokenizer


@dataclass
class ModelConfig:
    """front_end: a name in `features.FRONT_ENDS`; frame_rate: audio positions per second after the stem;
    span_voices: add to each end-time and label token the voice of its triple's span (needs a front end
    with window embeddings, `campplus_windows`); voice_similarity: add to the letter logits after each
    end time the cosine between the span's voice and each letter's voice so far (needs span_voices);
    time_pointer: add a frame-pointer score to the time-token logits (see the module docstring)."""

    front_end: str = "mel"
    frame_rate: float = 25.0
    n_mels: int = 80
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: Literal["prefix", "causal"] = "prefix"
    time_embedding: bool = True
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    activity_head: bool = False
    overlap_head: bool = False
    overlap_head_layers: int = 1
    span_voices: bool = False
    voice_similarity: bool = False
    time_pointer: bool = False

    def __post_init__(self):
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"unknown front_end {self.front_end!r} (choose from {', '.join(FRONT_ENDS)})")
        if self.span_voices and not hasattr(FRONT_ENDS[self.front_end], "forward_with_embeddings"):
            raise ValueError(f"span_voices needs a front end with window embeddings (campplus_windows), "
                             f"not {self.front_end!r}")
        if self.voice_similarity and not self.span_voices:
            raise ValueError("voice_similarity needs span_voices")
        for name in ("n_mels", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.frame_rate > 0 or not self.mlp_ratio > 0 or not self.rope_base > 1:
            raise ValueError("frame_rate and mlp_ratio must be positive and rope_base above 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout:g}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model must divide into n_heads heads of even size")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError("rope_fraction must lie in [0, 1]")
        if self.overlap_head_layers < 1:
            raise ValueError("overlap_head_layers must be at least 1")


def sinusoid(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(...,) -> (..., dim) sin/cos features of `values` at geometrically spaced frequencies."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, dim, 2, device=values.device) / dim)
    angles = values.float()[..., None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float, fraction: float = 1.0) -> torch.Tensor:
    """Rotate the first `fraction` of the dims of (B, H, L, hd) queries or keys by their (B, L) positions
    (RoPE, rotate-half layout); the other dims pass unrotated."""
    rotated = int(x.shape[-1] * fraction) // 2 * 2
    half = rotated // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    angles = positions.float()[:, None, :, None] * freqs
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rotated], x[..., rotated:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                   key_audio: torch.Tensor, prefix: bool) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool mask, True = may attend.

    Audio positions come before token positions in every item, so "key position <= query position"
    is the causal rule for everything, and prefix-LM just adds "every valid audio key is visible".
    When queries and keys are the same slots, each slot also sees itself, so padded slots never have an
    empty row (an all-masked row would give NaN, and NaN * 0 still poisons the next layer).
    """
    allowed = key_pos[:, None, :] <= query_pos[:, :, None]
    if prefix:
        allowed = allowed | key_audio[:, None, :]
    allowed = allowed & key_valid[:, None, :]
    if query_pos.shape[1] == key_pos.shape[1]:
        allowed = allowed | torch.eye(query_pos.shape[1], dtype=torch.bool, device=allowed.device)
    return allowed[:, None]


SIMILARITY_SCALE = 20.0
SIMILARITY_THRESHOLD = 0.75
SPEAKER_COUNT_CLASSES = 3  # none, one, two or more


@dataclass
class SpanState:
    """What span voices need to know about the tokens before a call: the last two tokens (B, 2), and for
    each letter the sum (B, K, E) and count (B, K) of the span voices labelled with it so far."""

    recent: torch.Tensor
    letter_sums: torch.Tensor
    letter_counts: torch.Tensor

    @classmethod
    def empty(cls, batch: int, num_speakers: int, embedding_size: int, pad: int, device: torch.device) -> "SpanState":
        return cls(torch.full((batch, 2), pad, dtype=torch.long, device=device),
                   torch.zeros(batch, num_speakers, embedding_size, device=device),
                   torch.zeros(batch, num_speakers, device=device))

    def select(self, rows: torch.Tensor) -> "SpanState":
        return SpanState(self.recent[rows], self.letter_sums[rows], self.letter_counts[rows])


class KVCache:
    """Keys and values of every layer for a growing batch of sequences, with the per-slot metadata
    (position, validity, audio or token) that the attention mask needs."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.audio = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.table: torch.Tensor | None = None
        self.activity: torch.Tensor | None = None  # (B, T, num_speakers) probabilities, from `prefill`
        self.speaker_counts: torch.Tensor | None = None  # (B, T, 3) probabilities of 0 / 1 / 2+ speakers
        self.voices: torch.Tensor | None = None  # (B, T, E) window embeddings, for span voices
        self.spans: SpanState | None = None
        self.pointer_keys: torch.Tensor | None = None  # (B, T, d) frame keys, for the time pointer
        self.frames: torch.Tensor | None = None  # (B,) real audio frames

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row r a copy of old row `rows[r]` (beam search re-ranking, or one row per beam)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.pos, self.valid, self.audio = self.pos[rows], self.valid[rows], self.audio[rows]
        if self.voices is not None:
            self.voices, self.spans = self.voices[rows], self.spans.select(rows)
        if self.pointer_keys is not None:
            self.pointer_keys, self.frames = self.pointer_keys[rows], self.frames[rows]

    def append(self, pos: torch.Tensor, valid: torch.Tensor, audio: torch.Tensor) -> slice:
        new = slice(self.length, self.length + pos.shape[1])
        if new.stop > self.pos.shape[1]:
            raise ValueError("KV cache is full")
        self.pos[:, new], self.valid[:, new], self.audio[:, new] = pos, valid, audio
        self.length = new.stop
        return new


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.rope_base, self.rope_fraction = config.rope_base, config.rope_fraction
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, slots: slice | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, pos, self.rope_base, self.rope_fraction), rotary(k, pos, self.rope_base, self.rope_fraction)
        if cache is not None:
            cache.keys[layer][:, :, slots] = k
            cache.values[layer][:, :, slots] = v
            k, v = cache.keys[layer][:, :, :slots.stop], cache.values[layer][:, :, :slots.stop]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.d_model)
        self.attention_norm = nn.RMSNorm(config.d_model)
        self.attention = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden, bias=False), nn.GELU(),
                                 nn.Linear(hidden, config.d_model, bias=False))
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos, mask, cache=None, layer=0, slots=None):
        x = x + self.residual_dropout(self.attention(self.attention_norm(x), pos, mask, cache, layer, slots))
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))


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


class DiarizationModel(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: Tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.front_end = FRONT_ENDS[config.front_end](config.d_model, config.frame_rate, config.n_mels)
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, config.d_model)
        self.time_projection = nn.Linear(config.d_model, config.d_model, bias=False) if config.time_embedding else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.activity = nn.Linear(config.d_model, tokenizer.num_speakers) if config.activity_head else None
        self.speaker_count = SpeakerCountHead(config.d_model, config.overlap_head_layers) if config.overlap_head else None
        self.span_projection = (nn.Linear(self.front_end.embedding_size, config.d_model, bias=False)
                                if config.span_voices else None)
        self.similarity_scale = self.similarity_threshold = None
        if config.voice_similarity:  # starts as nearest-centroid assignment: see `span_inputs`
            self.similarity_scale = nn.Parameter(torch.tensor(SIMILARITY_SCALE))
            self.similarity_threshold = nn.Parameter(torch.tensor(SIMILARITY_THRESHOLD))
        self.pointer_query = self.pointer_key = None
        if config.time_pointer:
            self.pointer_query = nn.Linear(config.d_model, config.d_model, bias=False)
            self.pointer_key = nn.Linear(config.d_model, config.d_model, bias=False)
        token_seconds = torch.zeros(tokenizer.vocab_size)
        is_time = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        times = torch.arange(tokenizer.num_time_tokens)
        token_seconds[tokenizer.time_offset + times] = times * tokenizer.resolution
        is_time[tokenizer.time_offset + times] = True
        self.register_buffer("token_seconds", token_seconds, persistent=False)
        self.register_buffer("token_is_time", is_time, persistent=False)
        for name, module in self.named_modules():
            if not name.startswith("front_end"):  # front ends initialise their own layers
                self._init_weights(module)
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.out.weight", "mlp.2.weight")):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.n_layers))
        if self.time_projection is not None:
            # Sinusoid features have unit size per pair; this starts P(t) at the 0.02 scale of the
            # embeddings. At 0.02 per weight, P(t) would be ten times larger and, through the tied
            # output layer, start training with a loss of ~25 instead of ~log(vocab).
            nn.init.normal_(self.time_projection.weight, std=0.02 * math.sqrt(2 / config.d_model))
        if self.span_projection is not None:
            nn.init.zeros_(self.span_projection.weight)  # a grown checkpoint starts as the same function
        if self.pointer_query is not None:
            nn.init.zeros_(self.pointer_query.weight)  # likewise
        time_frames = torch.round(times * tokenizer.resolution * config.frame_rate).long()
        self.register_buffer("time_token_frames", time_frames, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- embeddings ----------------------------------------------------------------------------
    def time_vectors(self, seconds: torch.Tensor) -> torch.Tensor:
        """P(t): where in the audio a position or a time token refers to, in model space."""
        return self.time_projection(sinusoid(seconds / self.tokenizer.resolution, self.config.d_model))

    def token_table(self) -> torch.Tensor:
        """(vocab, d) input embeddings, also the (tied) output layer."""
        table = self.token_embedding.weight
        if self.time_projection is not None:
            table = table + self.time_vectors(self.token_seconds) * self.token_is_time[:, None]
        return table

    def embed_audio(self, audio: torch.Tensor, audio_lengths: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Audio positions (B, T, d), real frame counts (B,), and with span voices the (B, T, E) window
        embeddings."""
        voices = None
        if self.span_projection is not None:
            x, frames, voices = self.front_end.forward_with_embeddings(audio, audio_lengths)
        else:
            x, frames = self.front_end(audio, audio_lengths)
        if self.time_projection is not None:
            seconds = torch.arange(x.shape[1], device=x.device) / self.config.frame_rate
            x = x + self.time_vectors(seconds)
        return x, frames, voices

    def span_inputs(self, tokens: torch.Tensor, lengths: torch.Tensor, state: SpanState, voices: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None, SpanState]:
        """(B, N, d) inputs added to `tokens` (of which `lengths` are real), (B, N, K) biases of the
        letter logits at each position (None without voice_similarity), and the state after the tokens.

        At the end time and the label of every triple: the unit mean window embedding over the triple's
        span, projected. With it, the position that predicts a label already holds the voice it is
        labelling, and every earlier label holds its own voice next to its letter.

        With `voice_similarity`, the letter logits after each end time also get, for every letter in use,
        scale * (cosine - threshold): the cosine between the span's voice and the mean voice of the
        spans labelled with that letter so far (prompt triples included). Unused letters get 0. At the
        starting values (scale 20, threshold 0.75, the best threshold for nearest-centroid assignment
        on validation spans) this alone is online nearest-centroid clustering; both values train, and
        the transformer's own logits correct it (overlapped spans, short turns). Left to learn the
        comparison from zero-initialised inputs, the small model had not started to after 500 steps.
        """
        context = torch.cat([state.recent, tokens], dim=1)
        is_time, seconds = self.token_is_time[context], self.token_seconds[context]
        current, last, before_last = (slice(2, None), slice(1, -1), slice(None, -2))
        is_end = is_time[:, current] & is_time[:, last]
        is_label = ~is_time[:, current] & (tokens > self.tokenizer.PROMPT_END) & is_time[:, last] & is_time[:, before_last]
        start = torch.where(is_end, seconds[:, last], seconds[:, before_last])
        end = torch.where(is_end, seconds[:, current], seconds[:, last])
        frame_seconds = torch.arange(voices.shape[1], device=voices.device) / self.config.frame_rate
        inside = ((frame_seconds >= start[..., None]) & (frame_seconds < end[..., None])
                  & (is_end | is_label)[..., None])
        pooled = F.normalize(torch.bmm(inside.to(voices.dtype), voices), dim=-1)
        extra, bias = self.span_projection(pooled), None
        last_real = (lengths - 1).clamp(min=0)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        after = SpanState(torch.stack([context[rows, last_real + 1], context[rows, last_real + 2]], dim=1),
                          state.letter_sums, state.letter_counts)
        if self.similarity_scale is not None:
            num_speakers = self.tokenizer.num_speakers
            letter = tokens - self.tokenizer.speaker_offset
            labelled = F.one_hot(letter.clamp(0, num_speakers - 1), num_speakers).to(pooled.dtype)
            labelled = labelled * (is_label & (letter >= 0))[..., None]  # (B, N, K)
            sums = state.letter_sums[:, None] + (labelled[..., None] * pooled[:, :, None]).cumsum(1)  # (B, N, K, E)
            counts = state.letter_counts[:, None] + labelled.cumsum(1)
            cosine = (F.normalize(sums, dim=-1) * pooled[:, :, None]).sum(-1)
            in_use = (counts > 0) & is_end[..., None]
            bias = torch.where(in_use, self.similarity_scale * (cosine - self.similarity_threshold), 0.0)
            after.letter_sums, after.letter_counts = sums[rows, last_real], counts[rows, last_real]
        return extra, bias, after

    def empty_span_state(self, voices: torch.Tensor) -> SpanState:
        return SpanState.empty(voices.shape[0], self.tokenizer.num_speakers, voices.shape[2], self.tokenizer.PAD,
                               voices.device)

    # --- full sequences (training, scoring) ----------------------------------------------------
    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor,
                token_lengths: torch.Tensor, frame_heads: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Logits (B, N, vocab) at every token position; logits[:, j] predict tokens[:, j + 1].

        With `frame_heads`, also the logits of the model's frame-level heads over the audio frames, by
        name ("activity": (B, T, num_speakers), "speaker_count": (B, T, 3)), and the (B,) count of real
        frames per item.
        """
        table = self.token_table()
        audio_x, frames, voices = self.embed_audio(audio, audio_lengths)
        extra = bias = None
        if voices is not None:
            extra, bias, _ = self.span_inputs(tokens, token_lengths, self.empty_span_state(voices), voices)
        hidden = self.hidden(audio_x, frames, tokens, token_lengths, table, token_extra=extra)
        token_hidden = hidden[:, -tokens.shape[1]:]
        logits = self.add_letter_bias(token_hidden @ table.T, bias)
        if self.pointer_query is not None:
            logits = self.add_pointer(logits, token_hidden, self.pointer_key(hidden[:, :audio_x.shape[1]]), frames)
        if not frame_heads:
            return logits
        if self.activity is None and self.speaker_count is None:
            raise ValueError("this model has no frame-level head (model.activity_head and model.overlap_head "
                             "are false)")
        audio_hidden = hidden[:, :audio_x.shape[1]]
        heads = {}
        if self.activity is not None:
            heads["activity"] = self.activity(audio_hidden)
        if self.speaker_count is not None:
            heads["speaker_count"] = self.speaker_count(audio_x, audio_hidden, frames)
        return logits, heads, frames

    def hidden(self, audio_x: torch.Tensor, frames: torch.Tensor, tokens: torch.Tensor,
               token_lengths: torch.Tensor, table: torch.Tensor, cache: KVCache | None = None,
               token_extra: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T + N, d) of embedded audio (B, T, d) with `frames` real frames per
        item, followed by `tokens` (B, N) of which `token_lengths` are real (plus `token_extra` (B, N, d)
        added to their embeddings)."""
        batch, num_frames, _ = audio_x.shape
        embedded = F.embedding(tokens, table)
        if token_extra is not None:
            embedded = embedded + token_extra.to(embedded.dtype)
        x = torch.cat([audio_x, embedded], dim=1)
        frame_index = torch.arange(num_frames, device=x.device).expand(batch, -1)
        token_index = torch.arange(tokens.shape[1], device=x.device).expand(batch, -1)
        pos = torch.cat([frame_index, frames[:, None] + token_index], dim=1)
        valid = torch.cat([frame_index < frames[:, None], token_index < token_lengths[:, None]], dim=1)
        is_audio = torch.cat([torch.ones_like(frame_index, dtype=torch.bool),
                              torch.zeros_like(token_index, dtype=torch.bool)], dim=1)
        mask = attention_mask(pos, pos, valid, is_audio, self.config.attention == "prefix")
        slots = cache.append(pos, valid, is_audio) if cache is not None else None
        for layer, block in enumerate(self.blocks):
            x = block(x, pos, mask, cache, layer, slots)
        return self.norm(x)

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor,
                token_lengths: torch.Tensor, max_new_tokens: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Run audio + given tokens once into a fresh cache.

        Returns the cache, the logits (B, vocab) after each item's last given token, and the position
        (B,) the next token of each item will take. With an activity head, `cache.activity` holds its
        probabilities for the audio frames, and with an overlap head `cache.speaker_counts` its.
        """
        table = self.token_table()
        frames = self.front_end.num_frames(audio_lengths)
        capacity = int(frames.max()) + tokens.shape[1] + max_new_tokens
        head_dim = self.config.d_model // self.config.n_heads
        cache = KVCache(self.config.n_layers, audio.shape[0], self.config.n_heads, head_dim, capacity,
                        audio.device, table.dtype)
        cache.table = table
        audio_x, frames, voices = self.embed_audio(audio, audio_lengths)
        extra = bias = None
        if voices is not None:
            extra, bias, cache.spans = self.span_inputs(tokens, token_lengths, self.empty_span_state(voices), voices)
            cache.voices = voices
        hidden = self.hidden(audio_x, frames, tokens, token_lengths, table, cache, token_extra=extra)
        if self.activity is not None:
            cache.activity = torch.sigmoid(self.activity(hidden[:, :audio_x.shape[1]]).float())
        if self.speaker_count is not None:
            counts = self.speaker_count(audio_x, hidden[:, :audio_x.shape[1]], frames)
            cache.speaker_counts = torch.softmax(counts.float(), dim=-1)
        rows = torch.arange(audio.shape[0])
        last = hidden[rows, audio_x.shape[1] + token_lengths - 1]
        last_bias = None if bias is None else bias[rows, token_lengths - 1]
        logits = self.add_letter_bias(last @ table.T, last_bias)
        if self.pointer_query is not None:
            cache.pointer_keys, cache.frames = self.pointer_key(hidden[:, :audio_x.shape[1]]), frames
            logits = self.add_pointer(logits[:, None], last[:, None], cache.pointer_keys, frames)[:, 0]
        return cache, logits, frames + token_lengths

    @torch.no_grad()
    def step(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed one token per item (B,) at positions (B,); returns the next logits (B, vocab)."""
        x = F.embedding(tokens[:, None], cache.table)
        bias = None
        if cache.voices is not None:
            extra, bias, cache.spans = self.span_inputs(tokens[:, None], torch.ones_like(tokens), cache.spans,
                                                        cache.voices)
            x = x + extra.to(x.dtype)
            bias = None if bias is None else bias[:, 0]
        pos = pos[:, None]
        valid = torch.ones_like(pos, dtype=torch.bool)
        slots = cache.append(pos, valid, torch.zeros_like(valid))
        mask = attention_mask(pos, cache.pos[:, :slots.stop], cache.valid[:, :slots.stop],
                              cache.audio[:, :slots.stop], self.config.attention == "prefix")
        for layer, block in enumerate(self.blocks):
            x = block(x, pos, mask, cache, layer, slots)
        x = self.norm(x)
        logits = self.add_letter_bias(x[:, 0] @ cache.table.T, bias)
        if self.pointer_query is not None:
            logits = self.add_pointer(logits[:, None], x, cache.pointer_keys, cache.frames)[:, 0]
        return logits

    def add_pointer(self, logits: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, frames: torch.Tensor
                    ) -> torch.Tensor:
        """(B, N, vocab) logits with, on each time token's column, the scaled dot product of the
        position's pointer query (from `hidden` (B, N, d)) and the key (B, T, d) of the frame at that
        time; times at or past an item's last real frame (of `frames`) get nothing."""
        scores = self.pointer_query(hidden) @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        index = self.time_token_frames.clamp(max=keys.shape[1] - 1)
        pointed = scores[..., index] * (self.time_token_frames[None, :] < frames[:, None])[:, None, :]
        first = self.tokenizer.time_offset
        last = first + self.tokenizer.num_time_tokens
        return torch.cat([logits[..., :first], logits[..., first:last] + pointed.to(logits.dtype), logits[..., last:]],
                         dim=-1)

    def add_letter_bias(self, logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(..., vocab) logits with (..., K) added to the speaker letters' columns."""
        if bias is None:
            return logits
        return torch.cat([logits[..., :self.tokenizer.speaker_offset], logits[..., self.tokenizer.speaker_offset:]
                          + bias.to(logits.dtype)], dim=-1)


def pad_audio(audio: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, samples) zero-padded float32 batch and (B,) lengths from 1-D arrays."""
    lengths = torch.tensor([len(a) for a in audio], dtype=torch.long)
    batch = torch.zeros(len(audio), max(int(lengths.max()), 1), dtype=torch.float32)
    for row, samples in enumerate(audio):
        batch[row, :len(samples)] = torch.from_numpy(np.asarray(samples, dtype=np.float32))
    return batch, lengths


def pad_values(sequences: Sequence[Sequence[float]], pad: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest) batch of token ids or weights padded with `pad`, and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    batch = torch.full((len(sequences), max(int(lengths.max()), 1)), pad, dtype=dtype)
    for row, values in enumerate(sequences):
        batch[row, :len(values)] = torch.tensor(list(values), dtype=dtype)
    return batch, lengths


def activity_targets(spans: torch.Tensor, num_frames: int, frame_rate: float, num_speakers: int) -> torch.Tensor:
    """(B, T, num_speakers) 0/1 targets: letter s talks at frame t (centred at t / frame_rate seconds),
    from (B, N, 3) spans (start, end, letter index; letter -1 = padding)."""
    times = torch.arange(num_frames, device=spans.device) / frame_rate
    letters = spans[..., 2].long()
    inside = (times >= spans[..., :1]) & (times < spans[..., 1:2]) & (letters[..., None] >= 0)  # (B, N, T)
    which = F.one_hot(letters.clamp(min=0), num_speakers).float()  # (B, N, S)
    return torch.einsum("bnt,bns->bts", inside.float(), which).clamp(max=1.0)


def activity_loss(logits: torch.Tensor, frames: torch.Tensor, spans: torch.Tensor, frame_rate: float) -> torch.Tensor:
    """Mean binary cross-entropy of (B, T, S) activity logits over the real frames of each item."""
    targets = activity_targets(spans, logits.shape[1], frame_rate, logits.shape[2])
    real = (torch.arange(logits.shape[1], device=logits.device) < frames[:, None]).float()[..., None]
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return (losses * real).sum() / (real.sum() * logits.shape[2]).clamp(min=1.0)


def speaker_count_loss(logits: torch.Tensor, frames: torch.Tensor, spans: torch.Tensor, frame_rate: float
                       ) -> torch.Tensor:
    """Mean cross-entropy of (B, T, 3) speaker-count logits (none, one, two or more) over the real
    frames of each item, the count taken from the same (B, N, 3) spans as the activity targets."""
    letters = int(spans[..., 2].max().clamp(min=0)) + 1
    targets = activity_targets(spans, logits.shape[1], frame_rate, letters).sum(-1)
    targets = targets.clamp(max=SPEAKER_COUNT_CLASSES - 1).long()
    real = torch.arange(logits.shape[1], device=logits.device) < frames[:, None]
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (losses * real).sum() / real.sum().clamp(min=1)


def sequence_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1].

    `weights` (B, N) belong to the predicted tokens: 0 for everything the model is only given
    (START, prompt triples, PROMPT_END, padding, times of noise turns).
    """
    target_weights = weights[:, 1:].float()
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    return (losses * target_weights).sum() / target_weights.sum().clamp(min=1e-8)
