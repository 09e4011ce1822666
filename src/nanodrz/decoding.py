"""From audio (and optional speaker prompts) to turns: grammar-constrained generation with a KV cache.

The grammar is a list of small logit filters, in the manner of openai/whisper: each one removes the
tokens that cannot come next, so whatever the model prefers, the output is a well-formed answer:

* `SlotFilter`: start, end, speaker in turn; EOS only where a triple could start; never PAD, START,
  PROMPT_END.
* `TimeOrderFilter`: starts never decrease (the training order), ends come after their start.
* `TimeRangeFilter`: times inside the chunk, i.e. after the prompt clips and before the audio ends.
* `SpeakerFilter`: a new letter only once all earlier letters are used, at most `max_speakers`.
* `LengthFilter`: EOS once `max_triples` triples are written.

`decode(model, audio, prompts, options)` is the one entry point; `DecodingOptions.strategy` picks how
a token is chosen from the filtered logits (greedy here; beam search and nucleus sampling plug in at
`choose`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE
from nanodrz.errors import NanodrzError
from nanodrz.model import DiarizationModel, pad_audio, pad_values
from nanodrz.tokenizer import Tokenizer


@dataclass
class DecodingOptions:
    """max_triples: most turns written per input; max_speakers: cap on letters (None = tokenizer's);
    keep_noise: also return turns the model labelled NOISE (speaker "NOISE")."""

    strategy: Literal["greedy"] = "greedy"
    max_triples: int = 64
    max_speakers: int | None = None
    keep_noise: bool = False


@dataclass
class DecodingResult:
    """Turns with speakers as letters; `letters` maps each prompt speaker name to its letter;
    `scores` is the model's probability of each turn's speaker token (a confidence)."""

    turns: list[Turn]
    scores: list[float]
    tokens: list[int]
    letters: dict[str, str] = field(default_factory=dict)


class GrammarState:
    """Where each item of a batch is in the answer grammar. All items step together, so the slot
    (0 start, 1 end, 2 speaker) is shared; finished items keep being fed EOS.

    Times are token ids: `min_time`/`max_time` bound the chunk, `last_start` is the start of the
    previous triple, `letters_used` counts letters so far (prompt letters included)."""

    def __init__(self, tokenizer: Tokenizer, min_time: torch.Tensor, max_time: torch.Tensor,
                 letters_used: torch.Tensor, max_speakers: int, max_triples: int):
        self.tokenizer = tokenizer
        self.min_time, self.max_time = min_time, max_time
        self.letters_used = letters_used
        self.max_speakers, self.max_triples = max_speakers, max_triples
        self.slot = 0
        self.triples = 0
        self.last_start = min_time.clone()
        self.current_start = min_time.clone()
        self.finished = torch.zeros_like(min_time, dtype=torch.bool)

    def update(self, tokens: torch.Tensor) -> None:
        tok = self.tokenizer
        if self.slot == 0:
            self.finished |= tokens == tok.EOS
            self.current_start = torch.where(self.finished, self.current_start, tokens)
        elif self.slot == 2:
            self.last_start = self.current_start.clone()
            new_letter = (tokens == tok.speaker_offset + self.letters_used) & ~self.finished
            self.letters_used = self.letters_used + new_letter.long()
            self.triples += 1
        self.slot = (self.slot + 1) % 3


class LogitFilter:
    """Sets the logits of tokens that may not come next to -inf, in place."""

    def apply(self, logits: torch.Tensor, state: GrammarState) -> None:
        raise NotImplementedError


def _token_ids(logits: torch.Tensor) -> torch.Tensor:
    return torch.arange(logits.shape[-1], device=logits.device)


def _time_ids(logits: torch.Tensor, tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, vocab) token ids and the mask of time tokens among them."""
    ids = _token_ids(logits)[None]
    return ids, (ids >= tok.time_offset) & (ids < tok.speaker_offset)


class SlotFilter(LogitFilter):
    def apply(self, logits, state):
        tok = state.tokenizer
        ids = _token_ids(logits)
        is_time = (ids >= tok.time_offset) & (ids < tok.speaker_offset)
        if state.slot == 2:
            allowed = ids >= tok.speaker_offset
            if tok.noise is not None:
                allowed |= ids == tok.noise
        elif state.slot == 1:
            allowed = is_time
        else:
            allowed = is_time | (ids == tok.EOS)
        logits[:, ~allowed] = -torch.inf
        logits[state.finished] = -torch.inf
        logits[state.finished, tok.EOS] = 0.0


class TimeOrderFilter(LogitFilter):
    def apply(self, logits, state):
        ids, is_time = _time_ids(logits, state.tokenizer)
        if state.slot == 0:
            logits[is_time & (ids < state.last_start[:, None])] = -torch.inf
        elif state.slot == 1:
            logits[is_time & (ids <= state.current_start[:, None])] = -torch.inf


class TimeRangeFilter(LogitFilter):
    def apply(self, logits, state):
        ids, is_time = _time_ids(logits, state.tokenizer)
        if state.slot == 0:
            # A start must leave room for an end after it.
            outside = (ids < state.min_time[:, None]) | (ids >= state.max_time[:, None])
        elif state.slot == 1:
            outside = ids > state.max_time[:, None]
        else:
            return
        logits[is_time & outside] = -torch.inf


class SpeakerFilter(LogitFilter):
    def apply(self, logits, state):
        if state.slot != 2:
            return
        tok = state.tokenizer
        letter = _token_ids(logits)[None] - tok.speaker_offset
        used = state.letters_used
        limit = torch.where(used < state.max_speakers, used, used - 1)
        logits[(letter >= 0) & (letter > limit[:, None])] = -torch.inf


class LengthFilter(LogitFilter):
    def apply(self, logits, state):
        if state.slot == 0 and state.triples >= state.max_triples:
            eos = state.tokenizer.EOS
            keep = logits[:, eos].clone()
            logits[:] = -torch.inf
            logits[:, eos] = keep


GRAMMAR = (SlotFilter(), TimeOrderFilter(), TimeRangeFilter(), SpeakerFilter(), LengthFilter())


def choose(logits: torch.Tensor, options: DecodingOptions) -> torch.Tensor:
    """The next token of every item from filtered logits (B, vocab)."""
    return logits.argmax(dim=-1)


@torch.no_grad()
def decode(model: DiarizationModel, audio: Sequence[np.ndarray], prompts: Sequence[Sequence[Turn]] | None = None,
           options: DecodingOptions | None = None) -> list[DecodingResult]:
    """Diarize a batch of 16 kHz inputs, each optionally preceded by speaker prompt clips.

    `prompts[i]` are the turns of the prompt clips at the start of `audio[i]` (see
    `examples.assemble_prompted_input`); answer turns are constrained to start after the last of them.
    """
    options = options or DecodingOptions()
    tok = model.tokenizer
    prompts = list(prompts) if prompts is not None else [[] for _ in audio]
    if len(prompts) != len(audio):
        raise ValueError("one prompt list per audio input is needed")
    max_samples = int(round(tok.config.max_seconds * SAMPLE_RATE))
    for a in audio:
        if len(a) > max_samples:
            raise NanodrzError(f"input of {len(a) / SAMPLE_RATE:.1f} s is longer than the model's "
                               f"{tok.config.max_seconds:g} s; cut it into chunks")
    max_speakers = min(options.max_speakers or tok.num_speakers, tok.num_speakers)
    encoded = [tok.encode(prompt, []) for prompt in prompts]
    given = [e.tokens[:-1] for e in encoded]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    audio_batch, audio_lengths = (t.to(device) for t in pad_audio(audio))
    tokens, token_lengths = pad_values(given, tok.PAD, torch.long)
    tokens, token_lengths = tokens.to(device), token_lengths.to(device)
    max_new = 3 * options.max_triples + 1
    cache, logits, pos = model.prefill(audio_batch, audio_lengths, tokens, token_lengths, max_new)
    state = GrammarState(
        tokenizer=tok,
        min_time=torch.tensor([tok.time_token(max((t.end for t in p), default=0.0)) for p in prompts], device=device),
        max_time=torch.tensor([tok.time_token(len(a) / SAMPLE_RATE) for a in audio], device=device),
        letters_used=torch.tensor([len(e.letters) for e in encoded], device=device),
        max_speakers=max_speakers, max_triples=options.max_triples)
    generated, probabilities = [], []
    for _ in range(max_new):
        logits = logits.float()
        for grammar_filter in GRAMMAR:
            grammar_filter.apply(logits, state)
        chosen = choose(logits, options)
        probabilities.append(torch.softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0])
        generated.append(chosen)
        state.update(chosen)
        if bool(state.finished.all()):
            break
        logits = model.step(cache, chosen, pos)
        pos = pos + 1
    model.train(was_training)
    return [_result(tok, torch.stack(generated, 1)[i].tolist(), torch.stack(probabilities, 1)[i].tolist(),
                    encoded[i].letters, options) for i in range(len(audio))]


def _result(tok: Tokenizer, tokens: list[int], probabilities: list[float], letters: dict[str, str],
            options: DecodingOptions) -> DecodingResult:
    if tok.EOS in tokens:
        end = tokens.index(tok.EOS)
        tokens, probabilities = tokens[:end], probabilities[:end]
    turns, scores = [], []
    for i in range(0, len(tokens) - 2, 3):
        start, stop, label = tokens[i:i + 3]
        if label == tok.noise and not options.keep_noise:
            continue
        speaker = "NOISE" if label == tok.noise else tok.letter_of(label)
        turns.append(Turn(round(tok.time_of(start), 6), round(tok.time_of(stop), 6), speaker))
        scores.append(probabilities[i + 2])
    return DecodingResult(turns, scores, tokens, dict(letters))
