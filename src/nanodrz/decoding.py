"""From audio (and optional speaker prompts) to turns: grammar-constrained generation with a KV cache.

The grammar (`Grammar`) removes the tokens that cannot come next, so whatever the model prefers, the
output is a well-formed answer: start, end, speaker in turn (never PAD, START, PROMPT_END); starts
never go back (the training order) and ends come after their start; times inside the chunk, i.e. after
the prompt clips and before the audio ends; a new letter only once all earlier letters are used, at most
`max_speakers`; EOS only where a triple could start, and once `max_triples` triples are written. In
every slot each item allows one range of token ids (plus EOS or NOISE), so a batch's mask is two
comparisons against a row of token ids, a handful of tensor operations per token.

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
from nanodrz.features import FrozenFeatures
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


class Grammar:
    """Where each item of a batch is in the answer grammar, and which tokens it allows next. All items
    step together, so the slot (0 start, 1 end, 2 speaker) is shared; finished items keep being fed EOS.

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
        self.token_ids = torch.arange(tokenizer.vocab_size, device=min_time.device)

    def allowed(self) -> torch.Tensor:
        """(B, vocab) True for the tokens that may come next. Each slot allows one range of token ids per
        item (every rule below narrows it), plus EOS where a triple could start and NOISE as a label:

        * start: not before the previous start (the training order), and past it once `max_speakers`
          triples share it (one per speaker: beyond that the model is repeating itself, a loop that would
          otherwise fill the whole answer with copies of one turn); inside the chunk, i.e. after the
          prompt clips and before the audio ends, leaving room for an end. EOS, unless fewer than
          `min_speakers` letters are used; nothing but EOS once `max_triples` triples are written.
        * end: after its start, at most the end of the audio.
        * speaker: a used letter, or the next new one while fewer than `max_speakers` are used.

        Finished items allow nothing (`constrain` gives them EOS)."""
        tok = self.tokenizer
        if self.slot == 0:
            first = torch.maximum(self.min_time, self.last_start + (self.ties >= self.max_speakers).long())
            stop = self.max_time if self.triples < self.max_triples else first
        elif self.slot == 1:
            first, stop = self.current_start + 1, self.max_time + 1
        else:
            used = self.letters_used
            first = torch.full_like(used, tok.speaker_offset)
            stop = tok.speaker_offset + torch.where(used < self.max_speakers, used + 1, used)
        allowed = (self.token_ids >= first[:, None]) & (self.token_ids < stop[:, None])
        if self.slot == 0:
            enough_letters = self.letters_used >= self.min_speakers
            allowed[:, tok.EOS] = enough_letters | (self.triples >= self.max_triples)
        elif self.slot == 2 and tok.noise is not None:
            allowed[:, tok.noise] = True
        return allowed & ~self.finished[:, None]

    def constrain(self, logits: torch.Tensor) -> None:
        """Set the logits (B, vocab) of tokens that may not come next to -inf, in place. Where nothing may
        (a finished item, or a dead end: a start forced past the end while a minimum speaker count still
        refuses EOS), EOS gets logit 0: the answer cannot go on."""
        allowed = self.allowed()
        logits.masked_fill_(~allowed, -torch.inf)
        eos = self.tokenizer.EOS
        logits[:, eos] = torch.where(allowed.any(dim=-1), logits[:, eos], 0.0)

    def update(self, tokens: torch.Tensor) -> None:
        tok = self.tokenizer
        if self.slot == 0:
            self.finished |= tokens == tok.EOS
            self.current_start = torch.where(self.finished, self.current_start, tokens)
        elif self.slot == 2:
            tied = (self.current_start == self.last_start) & (self.ties > 0)
            self.ties = torch.where(tied, self.ties + 1, torch.ones_like(self.ties))
            self.last_start = self.current_start
            new_letter = (tokens == tok.speaker_offset + self.letters_used) & ~self.finished
            self.letters_used = self.letters_used + new_letter.long()
            self.triples += 1
        self.slot = (self.slot + 1) % 3

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow a re-ranking of beams: row r now continues old row `rows[r]`."""
        for name in ("min_time", "max_time", "letters_used", "last_start", "current_start", "ties", "finished"):
            setattr(self, name, getattr(self, name)[rows])


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


@torch.inference_mode()
def decode(model: DiarizationModel, audio: Sequence[np.ndarray], prompts: Sequence[Sequence[Turn]] | None = None,
           options: DecodingOptions | None = None, frozen: Sequence[FrozenFeatures] | None = None
           ) -> list[DecodingResult]:
    """Diarize a batch of 16 kHz inputs, each optionally preceded by speaker prompt clips.

    `prompts[i]` are the turns of the prompt clips at the start of `audio[i]` (see
    `examples.assemble_prompted_input`); answer turns are constrained to start after the last of them.
    `frozen[i]`, when given, are the frozen encoders' outputs for `audio[i]` (`longform`'s encode-once).
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
    generation, logits, pos = model.prefill(audio_batch, audio_lengths, tokens, token_lengths, max_new,
                                            frozen=None if frozen is None else list(frozen))
    speaker_counts = generation.speaker_counts
    beams = options.beam_size if options.strategy == "beam" else 1
    if beams > 1:
        rows = torch.arange(len(audio), device=device).repeat_interleave(beams)
        generation.fork(rows)
        logits, pos = logits[rows], pos[rows]
    grammar = Grammar(
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
    generated = torch.full((len(audio) * beams, max_new), tok.EOS, dtype=torch.long, device=device)
    probabilities = torch.zeros(len(audio) * beams, max_new, device=device)
    lengths = torch.zeros(len(audio) * beams, device=device)
    for written in range(max_new):
        logits = logits.float()
        if options.eos_penalty:
            logits[:, tok.EOS] -= options.eos_penalty
        grammar.constrain(logits)
        if beams > 1:
            rows, chosen, scores = rerank_beams(scores, logits, beams)
            generation.rerank(rows)
            grammar.reorder(rows)
            logits, generated, probabilities, lengths = logits[rows], generated[rows], probabilities[rows], lengths[rows]
        else:
            chosen = choose(logits, options, generator)
        lengths += ~grammar.finished
        probabilities[:, written] = torch.softmax(logits, -1).gather(1, chosen[:, None])[:, 0]
        generated[:, written] = chosen
        grammar.update(chosen)
        if bool(grammar.finished.all()):
            break
        logits = model.step(generation, chosen, pos)
        pos = pos + 1
    model.train(was_training)
    if beams > 1:
        best = (scores / lengths.clamp(min=1)).view(len(audio), beams).argmax(dim=-1)
        keep = torch.arange(len(audio), device=device) * beams + best
        generated, probabilities = generated[keep], probabilities[keep]
    results = []
    for i, prompt in enumerate(encoded):
        tokens = generated[i, :written + 1].tolist()
        tokens = tokens[:tokens.index(tok.EOS)] if tok.EOS in tokens else tokens
        turns, turn_scores = tok.turns(tokens, probabilities[i, :len(tokens)].tolist(), options.keep_noise)
        results.append(DecodingResult(turns, turn_scores, tokens, dict(prompt.letters)))
    if speaker_counts is not None:
        frames = model.front_end.num_frames(audio_lengths)
        for i, result in enumerate(results):
            result.speaker_counts = speaker_counts[i, :int(frames[i])].cpu().numpy()
    return results
