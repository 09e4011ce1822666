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
* Two extras change what token positions read and write besides attention; both start as the identity
  (zero weights), so a model grown by them starts as the same function. Span voices (`span_voices`,
  with `voice_similarity`; see `SpanVoices`) add the voice of a triple's span to its end time and label,
  and bias the letter logits by how alike that voice and each letter's earlier spans are. The time
  pointer (`time_pointer`; see `TimePointer`) adds to every time token's logit the match between the
  writing position's query and the final state of the audio frame at that time: the tied output layer
  can only say *where* by reproducing a position code; the pointer lets a frame that sounds like a turn
  boundary vote for itself.
* `overlap_head: true` adds a read-out of every audio position (`SpeakerCountHead`): how many speakers
  talk in that frame (none, one, two or more), as in powerset segmentation. Long-form inference uses it to
  find overlapped speech the decoder did not write; grown onto a trained model with the rest frozen, it
  costs no change to what the decoder writes.
* Generation uses a KV cache: the prefix (audio + prompt tokens) is run once, then one token per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodrz.extras import SPEAKER_COUNT_CLASSES, SpanVoices, SpeakerCountHead, TimePointer
from nanodrz.features import FRONT_ENDS, FrozenFeatures
from nanodrz.tokenizer import Tokenizer


@dataclass
class ModelConfig:
    """front_end: a name in `features.FRONT_ENDS`; frame_rate: audio positions per second after the stem;
    span_voices: add to each end-time and label token the voice of its triple's span (needs a front end
    with window embeddings, `campplus_windows`); voice_similarity: add to the letter logits after each
    end time the cosine between the span's voice and each letter's voice so far (needs span_voices);
    time_pointer: add a frame-pointer score to the time-token logits (see the module docstring);
    activity_head: retired (a frame-level read-out of which letters talk, tried and not shipped); kept
    only so that checkpoints which stored it as false still load."""

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
        if self.activity_head:
            raise ValueError("activity_head is retired: no nanodrz model has one any more (set it to false or "
                             "leave it out; a checkpoint trained with one needs an older nanodrz)")
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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(..., B, H, L, hd) queries or keys rotated by the (B, 1, L, 2 * half) `DiarizationModel.rotary_angles`
    of their positions, as x * cos + (x with its halves swapped) * sin; the dims past the rotated ones pass
    unchanged."""
    rotated, half = cos.shape[-1], cos.shape[-1] // 2
    if cos.dtype != x.dtype:  # under autocast
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = torch.cat([x[..., half:rotated], x[..., :half]], dim=-1)
    y = x[..., :rotated] * cos + swapped * sin
    return y if rotated == x.shape[-1] else torch.cat([y, x[..., rotated:]], dim=-1)


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


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated for the longest one, and the
    attention bias (B, 1, 1, capacity) of every slot: 0 where it holds something to attend to, -inf for
    padding and for slots not written yet.

    A step's token comes after everything in the cache, so it may attend to every slot that holds
    something: the bias is its whole attention mask, kept up to date as slots are written."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.bias = torch.full((batch, 1, 1, capacity), -torch.inf, device=device, dtype=dtype)
        self.length = 0
        self.shared = 0  # slots [0, shared) hold the same in every beam of an input (`fork`)

    def fork(self, rows: torch.Tensor) -> None:
        """One row per beam, `rows` naming each one's input (`decode`'s beams); what is cached so far stays
        shared by the beams of an input."""
        self.keys, self.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        self.bias = self.bias[rows]
        self.shared = self.length

    def rerank(self, rows: torch.Tensor) -> None:
        """Make row r continue old row `rows[r]`, a beam of the same input. Beams differ only in the slots
        written since `fork` (the bias of those is 0 in every row), so only they are copied: copying whole
        caches cost more than the step itself."""
        written = slice(self.shared, self.length)
        for cached in self.keys + self.values:
            cached[:, :, written] = cached[rows, :, written]

    def append(self, count: int, valid: torch.Tensor | None = None) -> slice:
        """Claim the next `count` slots, of which `valid` (B, count) hold real positions (all of them when
        not given); returns them."""
        new = slice(self.length, self.length + count)
        if new.stop > self.bias.shape[-1]:
            raise ValueError("KV cache is full")
        self.bias[..., new] = 0.0
        if valid is not None:
            self.bias[:, 0, 0, new].masked_fill_(~valid, -torch.inf)
        self.length = new.stop
        return new


@dataclass
class TokenContext:
    """What the token positions of a batch read besides attention, fixed by its audio: the token table
    (input embeddings, and the tied output layer), and the model's extras for the batch."""

    table: torch.Tensor
    spans: SpanVoices | None = None
    pointer: TimePointer | None = None

    def select(self, rows: torch.Tensor) -> TokenContext:
        return TokenContext(self.table, None if self.spans is None else self.spans.select(rows),
                            None if self.pointer is None else self.pointer.select(rows))

    def rerank(self, rows: torch.Tensor) -> TokenContext:
        """`select` for rows that stay within their input's beams: what the audio fixes is the same there."""
        return TokenContext(self.table, None if self.spans is None else self.spans.rerank(rows), self.pointer)


@dataclass
class Generation:
    """What `DiarizationModel.step` carries from one token to the next, as `prefill` left it: the cache,
    the token context, and the `rotary_angles` (cos, sin; (capacity, 1, 1, 2 * half) each) of every position
    the cache can hold, so a step looks its angles up. With an overlap head, also its (B, T, 3)
    probabilities of none, one, and two or more speakers per frame."""

    cache: KVCache
    context: TokenContext
    rope: tuple[torch.Tensor, torch.Tensor]
    speaker_counts: torch.Tensor | None

    def fork(self, rows: torch.Tensor) -> None:
        """One row per beam, `rows` naming each one's input."""
        self.cache.fork(rows)
        self.context = self.context.select(rows)

    def rerank(self, rows: torch.Tensor) -> None:
        """Make row r continue old row `rows[r]`, a beam of the same input (beam search re-ranking)."""
        self.cache.rerank(rows)
        self.context = self.context.rerank(rows)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, slots: slice | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        (q, k), v = rotate(qkv[:2], *rope), qkv[2]
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

    def forward(self, x, rope, mask, cache=None, layer=0, slots=None):
        x = x + self.residual_dropout(self.attention(self.attention_norm(x), rope, mask, cache, layer, slots))
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))


@dataclass
class Pass:
    """One run of the transformer over audio and tokens (`DiarizationModel.run`): the audio inputs
    (B, T, d) with `frames` (B,) real per item, the final states of audio (B, T, d) and token (B, N, d)
    positions, the letter-logit bias of the token positions (None without voice similarity), and the
    token context the pass built."""

    audio_x: torch.Tensor
    frames: torch.Tensor
    audio_hidden: torch.Tensor
    token_hidden: torch.Tensor
    letter_bias: torch.Tensor | None
    context: TokenContext


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
        self.speaker_count = SpeakerCountHead(config.d_model, config.overlap_head_layers) if config.overlap_head else None
        # The extras' layers (see `extras.py`), under the names checkpoints store them by.
        self.span_projection = (nn.Linear(self.front_end.embedding_size, config.d_model, bias=False)
                                if config.span_voices else None)
        self.similarity_scale = self.similarity_threshold = None
        if config.voice_similarity:  # starts as nearest-centroid assignment: see `SpanVoices`
            self.similarity_scale = nn.Parameter(torch.tensor(20.0))
            self.similarity_threshold = nn.Parameter(torch.tensor(0.75))
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
        for layer in (self.span_projection, self.pointer_query):
            if layer is not None:
                nn.init.zeros_(layer.weight)  # a grown checkpoint starts as the same function
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

    def embed_audio(self, audio: torch.Tensor, audio_lengths: torch.Tensor,
                    frozen: list[FrozenFeatures] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Audio positions (B, T, d), real frame counts (B,), and with span voices the (B, T, E) window
        embeddings; `frozen` gives the frozen encoders' outputs instead of computing them."""
        voices = None
        given = {} if frozen is None else {"frozen": frozen}
        if self.span_projection is not None:
            x, frames, voices = self.front_end.forward_with_embeddings(audio, audio_lengths, **given)
        else:
            x, frames = self.front_end(audio, audio_lengths, **given)
        if self.time_projection is not None:
            seconds = torch.arange(x.shape[1], device=x.device) / self.config.frame_rate
            x = x + self.time_vectors(seconds)
        return x, frames, voices

    def embed_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor, context: TokenContext
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, d) inputs of `tokens` (B, N), of which `lengths` are real, and the (B, N, K) bias of the
        letter logits at each of their positions (None without voice similarity); advances the extras'
        state in `context` past them."""
        x = F.embedding(tokens, context.table)
        extra, bias = (None, None) if context.spans is None else context.spans.advance(tokens, lengths)
        return (x, bias) if extra is None else (x + extra.to(x.dtype), bias)

    def token_logits(self, hidden: torch.Tensor, letter_bias: torch.Tensor | None, context: TokenContext
                     ) -> torch.Tensor:
        """(B, N, vocab) next-token logits from the final states (B, N, d) of token positions: the tied
        output layer, plus the extras' letter bias and time-pointer scores."""
        logits = hidden @ context.table.T
        if letter_bias is not None:
            logits[..., self.tokenizer.speaker_offset:] += letter_bias.to(logits.dtype)
        if context.pointer is not None:
            time_tokens = slice(self.tokenizer.time_offset, self.tokenizer.time_offset + self.tokenizer.num_time_tokens)
            logits[..., time_tokens] += context.pointer.scores(hidden).to(logits.dtype)
        return logits

    # --- full sequences (training, scoring, prefill) -------------------------------------------
    def run(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor,
            token_lengths: torch.Tensor, cache: KVCache | None = None,
            frozen: list[FrozenFeatures] | None = None) -> Pass:
        """Audio and `tokens` (B, N), of which `token_lengths` are real, through the transformer (filling
        `cache` when given)."""
        audio_x, frames, voices = self.embed_audio(audio, audio_lengths, frozen)
        context = TokenContext(self.token_table())
        if voices is not None:
            context.spans = SpanVoices.start(self, voices)
        x, letter_bias = self.embed_tokens(tokens, token_lengths, context)
        hidden = self.hidden(audio_x, frames, x, token_lengths, cache)
        audio_hidden, token_hidden = hidden.split([audio_x.shape[1], tokens.shape[1]], dim=1)
        if self.pointer_key is not None:
            context.pointer = TimePointer.start(self, audio_hidden, frames)
        return Pass(audio_x, frames, audio_hidden, token_hidden, letter_bias, context)

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor,
                token_lengths: torch.Tensor, frame_heads: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Logits (B, N, vocab) at every token position; logits[:, j] predict tokens[:, j + 1].

        With `frame_heads`, also the logits of the model's frame-level heads over the audio frames, by
        name ("speaker_count": (B, T, 3)), and the (B,) count of real frames per item.
        """
        run = self.run(audio, audio_lengths, tokens, token_lengths)
        logits = self.token_logits(run.token_hidden, run.letter_bias, run.context)
        if not frame_heads:
            return logits
        if self.speaker_count is None:
            raise ValueError("this model has no frame-level head (model.overlap_head is false)")
        return logits, {"speaker_count": self.speaker_count(run.audio_x, run.audio_hidden, run.frames)}, run.frames

    def hidden(self, audio_x: torch.Tensor, frames: torch.Tensor, token_x: torch.Tensor,
               token_lengths: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T + N, d) of embedded audio (B, T, d) with `frames` real frames per
        item, followed by embedded tokens (B, N, d) of which `token_lengths` are real."""
        batch, num_frames, _ = audio_x.shape
        x = torch.cat([audio_x, token_x], dim=1)
        frame_index = torch.arange(num_frames, device=x.device).expand(batch, -1)
        token_index = torch.arange(token_x.shape[1], device=x.device).expand(batch, -1)
        pos = torch.cat([frame_index, frames[:, None] + token_index], dim=1)
        valid = torch.cat([frame_index < frames[:, None], token_index < token_lengths[:, None]], dim=1)
        is_audio = torch.cat([torch.ones_like(frame_index, dtype=torch.bool),
                              torch.zeros_like(token_index, dtype=torch.bool)], dim=1)
        mask = attention_mask(pos, pos, valid, is_audio, self.config.attention == "prefix")
        slots = cache.append(valid.shape[1], valid) if cache is not None else None
        cos, sin = self.rotary_angles(pos)
        return self.transformer(x, (cos[:, None], sin[:, None]), mask, cache, slots)

    def rotary_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (..., 2 * half) of the RoPE angles of positions (...), for `rotate`: the first
        2 * half = `rope_fraction` of a head's dims rotate, dim i with dim i + half. Computed once per pass
        (or once per generation, as a table over positions), shared by every layer's queries and keys."""
        half = int(self.config.d_model // self.config.n_heads * self.config.rope_fraction) // 2
        exponents = torch.arange(half, device=positions.device, dtype=torch.float32) / max(half, 1)
        angles = positions.float()[..., None] * self.config.rope_base ** -exponents
        cos, sin = torch.cos(angles), torch.sin(angles)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def transformer(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                    cache: KVCache | None = None, slots: slice | None = None) -> torch.Tensor:
        """The blocks and final norm over inputs (B, L, d) with (B, 1, L, 2 * half) `rotary_angles`."""
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, layer, slots)
        return self.norm(x)

    # --- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, audio: torch.Tensor, audio_lengths: torch.Tensor, tokens: torch.Tensor,
                token_lengths: torch.Tensor, max_new_tokens: int, frozen: list[FrozenFeatures] | None = None
                ) -> tuple[Generation, torch.Tensor, torch.Tensor]:
        """Run audio + given tokens once into a fresh cache (`frozen`: see `embed_audio`).

        Returns what `step` needs, the logits (B, vocab) after each item's last given token, and the
        position (B,) the next token of each item will take.
        """
        frames = self.front_end.num_frames(audio_lengths)
        capacity = int(frames.max()) + tokens.shape[1] + max_new_tokens
        head_dim = self.config.d_model // self.config.n_heads
        cache = KVCache(self.config.n_layers, audio.shape[0], self.config.n_heads, head_dim, capacity,
                        audio.device, self.token_embedding.weight.dtype)
        run = self.run(audio, audio_lengths, tokens, token_lengths, cache, frozen)
        last = (torch.arange(audio.shape[0]), token_lengths - 1)
        bias = None if run.letter_bias is None else run.letter_bias[last][:, None]
        logits = self.token_logits(run.token_hidden[last][:, None], bias, run.context)[:, 0]
        speaker_counts = None
        if self.speaker_count is not None:
            counts = self.speaker_count(run.audio_x, run.audio_hidden, run.frames)
            speaker_counts = torch.softmax(counts.float(), dim=-1)
        rope = self.rotary_angles(torch.arange(capacity, device=audio.device)[:, None, None])
        return Generation(cache, run.context, rope, speaker_counts), logits, run.frames + token_lengths

    @torch.inference_mode()
    def step(self, generation: Generation, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed one token per item (B,) at positions (B,); returns the next logits (B, vocab)."""
        x, letter_bias = self.embed_tokens(tokens[:, None], torch.ones_like(tokens), generation.context)
        cache = generation.cache
        slots = cache.append(1)
        rope = tuple(angles[pos] for angles in generation.rope)
        hidden = self.transformer(x, rope, cache.bias[..., :slots.stop], cache, slots)
        return self.token_logits(hidden, letter_bias, generation.context)[:, 0]


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


def speaker_count_targets(spans: torch.Tensor, num_frames: int, frame_rate: float) -> torch.Tensor:
    """(B, T) class of every frame (0 none, 1 one, 2 two or more speakers; frame t centred at
    t / frame_rate seconds) from (B, N, 3) spans (start, end, letter index; letter -1 = padding). A
    letter counts once however many of its spans cover the frame."""
    times = torch.arange(num_frames, device=spans.device) / frame_rate
    letters = spans[..., 2].long()
    inside = (times >= spans[..., :1]) & (times < spans[..., 1:2]) & (letters[..., None] >= 0)  # (B, N, T)
    which = F.one_hot(letters.clamp(min=0), int(letters.max().clamp(min=0)) + 1).float()  # (B, N, letters)
    talking = torch.einsum("bnt,bns->bts", inside.float(), which).clamp(max=1.0)
    return talking.sum(-1).clamp(max=SPEAKER_COUNT_CLASSES - 1).long()


def speaker_count_loss(logits: torch.Tensor, frames: torch.Tensor, spans: torch.Tensor, frame_rate: float
                       ) -> torch.Tensor:
    """Mean cross-entropy of (B, T, 3) speaker-count logits (none, one, two or more) over the real
    frames of each item, the classes from `speaker_count_targets`."""
    targets = speaker_count_targets(spans, logits.shape[1], frame_rate)
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

