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
a token is chosen from the filtered logits: greedy (argmax), beam search (the `beam_size` best partial
answers by summed log-probability, the best finished one by mean log-probability per token), or
nucleus sampling (Pix2Seq found sampling gives higher recall than argmax). Beams are rows of the batch:
the KV cache and the grammar state are reordered whenever beams are re-ranked.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE
from nanodrz.errors import NanodrzError
from nanodrz.model import DiarizationModel, pad_audio, pad_values
from nanodrz.tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodingOptions:
    """max_triples: most turns written per input; max_speakers: cap on letters (None = tokenizer's);
    min_speakers: EOS is refused until this many letters (prompt letters included) are used;
    keep_noise: also return turns the model labelled NOISE (speaker "NOISE"); beam_size: beams per
    input for "beam"; temperature, top_p, seed: nucleus sampling for "sample"; eos_penalty: subtracted
    from the EOS logit (nats): the shipped model stops too early without it (8 was the best of 0 / 4 / 8
    on validation speakers, see MODEL_CARD.md).

    Frozen, as checked once: a variant is `dataclasses.replace(options, ...)`, which checks it again."""

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    max_triples: int = 64
    max_speakers: int | None = None
    min_speakers: int = 0
    keep_noise: bool = False
    beam_size: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0
    eos_penalty: float = 8.0  # the default model (v1); model v2 takes 2 (benchmarks/results/pipeline_settings.md)

    def __post_init__(self):
        for name in ("eos_penalty", "temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise NanodrzError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.strategy not in ("greedy", "beam", "sample"):
            raise NanodrzError(f"unknown decoding strategy {self.strategy!r} (greedy, beam or sample)")
        if self.beam_size < 1 or self.max_triples < 1:
            raise NanodrzError("beam_size and max_triples must be at least 1")
        if not self.eos_penalty >= 0:
            raise NanodrzError("eos_penalty must not be negative")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise NanodrzError("temperature must be positive and top_p in (0, 1]")


@dataclass
class DecodingResult:
    """Turns with speakers as letters; `letters` maps each prompt speaker name to its letter;
    `scores` is the model's probability of each turn's speaker token (a confidence); with an overlap
    head, `speaker_counts` (frames, 3) is its probability of none, one, and two or more speakers in
    every audio frame of the input (frame t centred at t / frame_rate seconds)."""

    turns: list[Turn]
    scores: list[float]
    tokens: list[int]
    letters: dict[str, str] = field(default_factory=dict)
    speaker_counts: np.ndarray | None = None


class GrammarState:
    """Where each item of a batch is in the answer grammar. All items step together, so the slot
    (0 start, 1 end, 2 speaker) is shared; finished items keep being fed EOS.

    Times are token ids: `min_time`/`max_time` bound the chunk, `last_start` is the start of the
    previous triple, `ties` how many triples in a row start there, `letters_used` counts letters so far
    (prompt letters included)."""

    def __init__(self, tokenizer: Tokenizer, min_time: torch.Tensor, max_time: torch.Tensor,
                 letters_used: torch.Tensor, max_speakers: int, max_triples: int, min_speakers: int = 0):
        self.tokenizer = tokenizer
        self.min_time, self.max_time = min_time, max_time
        self.letters_used = letters_used
        self.max_speakers, self.max_triples = max_speakers, max_triples
        self.min_speakers = min(min_speakers, max_speakers)
        self.slot = 0
        self.triples = 0
        self.last_start = min_time.clone()
        self.current_start = min_time.clone()
        self.ties = torch.zeros_like(min_time)
        self.finished = torch.zeros_like(min_time, dtype=torch.bool)

    def update(self, tokens: torch.Tensor) -> None:
        tok = self.tokenizer
        if self.slot == 0:
            self.finished |= tokens == tok.EOS
            self.current_start = torch.where(self.finished, self.current_start, tokens)
        elif self.slot == 2:
            tied = (self.current_start == self.last_start) & (self.ties > 0)
            self.ties = torch.where(tied, self.ties + 1, torch.ones_like(self.ties))
            self.last_start = self.current_start.clone()
            new_letter = (tokens == tok.speaker_offset + self.letters_used) & ~self.finished
            self.letters_used = self.letters_used + new_letter.long()
            self.triples += 1
        self.slot = (self.slot + 1) % 3

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow a re-ranking of beams: row r now continues old row `rows[r]`."""
        for name in ("min_time", "max_time", "letters_used", "last_start", "current_start", "ties", "finished"):
            setattr(self, name, getattr(self, name)[rows])


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
        if state.slot == 0 and state.triples < state.max_triples:
            logits[state.letters_used < state.min_speakers, tok.EOS] = -torch.inf
        logits[state.finished] = -torch.inf
        logits[state.finished, tok.EOS] = 0.0


class TimeOrderFilter(LogitFilter):
    """Starts never go back; ends come after their start. At most `max_speakers` triples share a start
    (one per speaker): beyond that the model is repeating itself, a loop that would otherwise fill the
    whole answer with copies of one turn, so the next start must move on."""

    def apply(self, logits, state):
        ids, is_time = _time_ids(logits, state.tokenizer)
        if state.slot == 0:
            earliest = state.last_start + (state.ties >= state.max_speakers).long()
            logits[is_time & (ids < earliest[:, None])] = -torch.inf
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


class DeadEndFilter(LogitFilter):
    """Where the rules above leave nothing (a start forced past the end while a minimum speaker count
    still refuses EOS), EOS: the answer cannot go on."""

    def apply(self, logits, state):
        logits[(logits == -torch.inf).all(dim=-1), state.tokenizer.EOS] = 0.0


GRAMMAR = (SlotFilter(), TimeOrderFilter(), TimeRangeFilter(), SpeakerFilter(), LengthFilter(), DeadEndFilter())


def choose(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row from filtered logits (B, vocab): argmax, or a nucleus sample."""
    if options.strategy != "sample":
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / options.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first one).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= options.top_p
    sorted_probs[outside] = 0.0
    picked = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, picked)[:, 0]


def rerank_beams(scores: torch.Tensor, logits: torch.Tensor, beam_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search step. `scores` (B*K,) are the beams' summed log-probabilities, `logits` their
    filtered next-token logits. Returns the rows each new beam continues, its token and new score."""
    rows, vocab = logits.shape
    candidates = scores[:, None] + torch.log_softmax(logits, dim=-1)
    best, index = candidates.view(rows // beam_size, beam_size * vocab).topk(beam_size, dim=-1)
    base = torch.arange(rows // beam_size, device=logits.device)[:, None] * beam_size
    return (base + index // vocab).reshape(-1), (index % vocab).reshape(-1), best.reshape(-1)


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
    cap = tok.num_speakers if options.max_speakers is None else options.max_speakers
    max_speakers = max(1, min(cap, tok.num_speakers))
    encoded = [tok.encode(prompt, []) for prompt in prompts]
    given = [e.tokens[:-1] for e in encoded]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    audio_batch, audio_lengths = (t.to(device) for t in pad_audio(audio))
    tokens, token_lengths = pad_values(given, tok.PAD, torch.long)
    tokens, token_lengths = tokens.to(device), token_lengths.to(device)
    max_new = 3 * options.max_triples + 1
    generation, logits, pos = model.prefill(audio_batch, audio_lengths, tokens, token_lengths, max_new)
    speaker_counts = generation.speaker_counts
    beams = options.beam_size if options.strategy == "beam" else 1
    if beams > 1:
        rows = torch.arange(len(audio), device=device).repeat_interleave(beams)
        generation.reorder(rows)
        logits, pos = logits[rows], pos[rows]
    state = GrammarState(
        tokenizer=tok,
        min_time=torch.tensor([tok.time_token(max((t.end for t in p), default=0.0)) for p in prompts],
                              device=device).repeat_interleave(beams),
        max_time=torch.tensor([tok.time_token(len(a) / SAMPLE_RATE) for a in audio],
                              device=device).repeat_interleave(beams),
        letters_used=torch.tensor([len(e.letters) for e in encoded], device=device).repeat_interleave(beams),
        max_speakers=max_speakers, max_triples=options.max_triples, min_speakers=options.min_speakers)
    generator = torch.Generator(device=device).manual_seed(options.seed) if options.strategy == "sample" else None
    # Beam scores start with one live beam per input, so the identical copies do not fill the beam.
    scores = torch.zeros(len(audio) * beams, device=device)
    if beams > 1:
        scores.view(len(audio), beams)[:, 1:] = -torch.inf
    generated = torch.zeros(len(audio) * beams, 0, dtype=torch.long, device=device)
    probabilities = torch.zeros(len(audio) * beams, 0, device=device)
    lengths = torch.zeros(len(audio) * beams, device=device)
    for _ in range(max_new):
        logits = logits.float()
        if options.eos_penalty:
            logits[:, tok.EOS] -= options.eos_penalty
        for grammar_filter in GRAMMAR:
            grammar_filter.apply(logits, state)
        if beams > 1:
            rows, chosen, scores = rerank_beams(scores, logits, beams)
            generation.reorder(rows)
            state.reorder(rows)
            logits, generated, probabilities, lengths = logits[rows], generated[rows], probabilities[rows], lengths[rows]
        else:
            chosen = choose(logits, options, generator)
        lengths = lengths + (~state.finished).float()
        probabilities = torch.cat([probabilities, torch.softmax(logits, -1).gather(1, chosen[:, None])], dim=1)
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        state.update(chosen)
        if bool(state.finished.all()):
            break
        logits = model.step(generation, chosen, pos)
        pos = pos + 1
    model.train(was_training)
    if beams > 1:
        best = (scores / lengths.clamp(min=1)).view(len(audio), beams).argmax(dim=-1)
        keep = torch.arange(len(audio), device=device) * beams + best
        generated, probabilities = generated[keep], probabilities[keep]
    results = [_result(tok, generated[i].tolist(), probabilities[i].tolist(), encoded[i].letters, options)
               for i in range(len(audio))]
    if speaker_counts is not None:
        frames = model.front_end.num_frames(audio_lengths)
        for i, result in enumerate(results):
            result.speaker_counts = speaker_counts[i, :int(frames[i])].cpu().numpy()
    return results


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
