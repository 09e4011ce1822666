"""Vocabulary and the mapping between speech turns and token sequences.

The model reads audio, then writes

    START  [prompt triples]  PROMPT_END  [answer triples]  EOS

where a triple is (start time, end time, speaker letter). The vocabulary is laid out as

    PAD EOS START PROMPT_END [NOISE] time_0 ... time_N  A B C ...

Time token k means k * time_resolution seconds, for k = 0 .. N with N = max_seconds / time_resolution,
so both 0 s and exactly `max_seconds` have a token of their own and the time range can never run
into the speaker range (the original prototype's last time bin collided with speaker A).

Speakers are lettered by first appearance: prompt speakers take A, B, ... in prompt order, speakers
first heard in the chunk continue after them in order of their first turn. Letters are therefore a
pure function of the audio, which is what lets a decoder write them without knowing identities.

Triples are ordered by (start, end) of their quantised times, ties broken by letter, so the order the
model must produce is exactly the order the grammar in `decoding.py` enforces.

NOISE (optional) labels the fake turns of Pix2Seq sequence augmentation: the model learns to label
junk rather than avoid writing it, and turns it labels NOISE are dropped when decoding.

Letters are this module's to hand out: `letter` and `letter_index` are the only arithmetic on them,
and `Tokenizer.turns` the only reading of token sequences back into turns.
"""

from __future__ import annotations

import math
import string
from dataclasses import asdict, dataclass
from typing import Sequence

from nanodrz.annotation import Turn
from nanodrz.config import from_dict
from nanodrz.errors import ConfigError, NanodrzError

TOKENIZER_VERSION = 1
LETTERS = string.ascii_uppercase
NOISE_SPEAKER = "NOISE"  # the speaker of NOISE-labelled turns, where they are kept


def letter(index: int) -> str:
    """Speaker letter number `index` from 0: A ... Z, then AA, AB, ... (as spreadsheet columns), so a
    recording can have more speakers than one chunk's single letters and still be labelled by letters."""
    if index < 0:
        raise ValueError(f"letter index must not be negative, got {index}")
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, len(LETTERS))
        label = LETTERS[rest] + label
    return label


def letter_index(label: str) -> int | None:
    """The number of a speaker letter (A = 0, Z = 25, AA = 26), or None for a label that is not one."""
    if not label or any(character not in LETTERS for character in label):
        return None
    index = 0
    for character in label:
        index = index * len(LETTERS) + LETTERS.index(character) + 1
    return index - 1


@dataclass
class TokenizerConfig:
    """time_resolution: seconds per time bin; max_seconds: longest input (prompt clips + chunk);
    num_speakers: speaker letters available; noise_token: reserve a NOISE label for sequence augmentation."""

    time_resolution: float = 0.02
    max_seconds: float = 30.0
    num_speakers: int = 8
    noise_token: bool = True

    def __post_init__(self):
        if self.time_resolution <= 0 or self.max_seconds <= 0:
            raise ConfigError("time_resolution and max_seconds must be positive")
        bins = self.max_seconds / self.time_resolution
        if abs(bins - round(bins)) > 1e-6:
            raise ConfigError("max_seconds must be a whole number of time_resolution bins")
        if not 1 <= self.num_speakers <= len(LETTERS):
            raise ConfigError(f"num_speakers must be between 1 and {len(LETTERS)}")


@dataclass
class Encoded:
    """A token sequence with per-token loss weights (0 for tokens the model is only given)."""

    tokens: list[int]
    weights: list[float]
    letters: dict[str, str]


class Tokenizer:
    PAD = 0
    EOS = 1
    START = 2
    PROMPT_END = 3

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = config or TokenizerConfig()
        self.resolution = self.config.time_resolution
        self.noise = 4 if self.config.noise_token else None
        self.time_offset = 5 if self.config.noise_token else 4
        self.num_time_tokens = int(round(self.config.max_seconds / self.resolution)) + 1
        self.speaker_offset = self.time_offset + self.num_time_tokens
        self.num_speakers = self.config.num_speakers
        self.vocab_size = self.speaker_offset + self.num_speakers

    # --- token classes -------------------------------------------------------------------------
    def time_token(self, seconds: float) -> int:
        """Nearest time bin, clipped to [0, max_seconds]."""
        index = int(math.floor(seconds / self.resolution + 0.5))
        return self.time_offset + min(max(index, 0), self.num_time_tokens - 1)

    def time_of(self, token: int) -> float:
        return (token - self.time_offset) * self.resolution

    def is_time(self, token: int) -> bool:
        return self.time_offset <= token < self.speaker_offset

    def speaker_token(self, label: str) -> int:
        index = letter_index(label)
        if index is None or index >= self.num_speakers:
            raise NanodrzError(f"speaker {label!r} is not one of the {self.num_speakers} letters of the tokenizer")
        return self.speaker_offset + index

    def letter_of(self, token: int) -> str:
        return letter(token - self.speaker_offset)

    def is_speaker(self, token: int) -> bool:
        return self.speaker_offset <= token < self.vocab_size

    # --- encoding ------------------------------------------------------------------------------
    def encode(self, prompt: Sequence[Turn], turns: Sequence[Turn], noise: Sequence[tuple[float, float]] = (),
               eos_weight: float = 1.0) -> Encoded:
        """Tokens for prompt turns (given, no loss) and answer turns (trained), then EOS.

        Speaker names are arbitrary strings (bank ids); the returned `letters` maps them to letters.
        `noise` are fake (start, end) spans labelled NOISE: their times get weight 0 and their label
        weight 1, as in Pix2Seq, so the model learns to recognise junk rather than to write it.
        """
        prompt_triples = self._quantise(prompt)
        answer_triples = self._quantise(turns)
        order = list(dict.fromkeys(speaker for _, _, speaker in prompt_triples + answer_triples))
        if len(order) > self.num_speakers:
            raise NanodrzError(f"{len(order)} speakers in one example, but the tokenizer has {self.num_speakers}")
        letters = {speaker: letter(i) for i, speaker in enumerate(order)}
        tokens = [self.START]
        for start, end, speaker in sorted(prompt_triples, key=lambda t: (t[0], t[1], letters[t[2]])):
            tokens += [start, end, self.speaker_token(letters[speaker])]
        tokens.append(self.PROMPT_END)
        weights = [0.0] * len(tokens)
        answer = [(s, e, self.speaker_token(letters[spk]), 1.0) for s, e, spk in answer_triples]
        if noise:
            if self.noise is None:
                raise ValueError("noise turns need a tokenizer with noise_token: true")
            answer += [(s, e, self.noise, 0.0) for s, e, _ in self._quantise([Turn(a, b, "") for a, b in noise])]
        for start, end, label, time_weight in sorted(answer, key=lambda t: t[:3]):
            tokens += [start, end, label]
            weights += [time_weight, time_weight, 1.0]
        tokens.append(self.EOS)
        weights.append(eos_weight)
        return Encoded(tokens, weights, letters)

    def _quantise(self, turns: Sequence[Turn]) -> list[tuple[int, int, str]]:
        """(start token, end token, speaker); turns shorter than one bin after rounding are dropped."""
        triples = []
        for turn in turns:
            start, end = self.time_token(turn.start), self.time_token(turn.end)
            if end > start:
                triples.append((start, end, turn.speaker))
        # First appearance is decided on quantised times, the order the model sees.
        return sorted(triples, key=lambda t: (t[0], t[1], t[2]))

    # --- decoding ------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int]) -> list[Turn]:
        """Turns (speaker = letter) from the answer part of a token sequence; see `turns`."""
        return self.turns(tokens)[0]

    def turns(self, tokens: Sequence[int], probabilities: Sequence[float] | None = None,
              keep_noise: bool = False) -> tuple[list[Turn], list[float]]:
        """Turns (speaker = letter) of the answer part of a token sequence, and the probability of each
        turn's label token (`probabilities`, one per token; 1.0 where not given) as its score.

        Accepts a full sequence (everything up to PROMPT_END is skipped) or just generated tokens; stops
        at EOS; drops malformed triples (end not after start, a token in the wrong slot), and NOISE-labelled
        ones unless `keep_noise` (then their speaker is NOISE_SPEAKER).
        """
        tokens = list(tokens)
        probabilities = [1.0] * len(tokens) if probabilities is None else list(probabilities)
        first = tokens.index(self.PROMPT_END) + 1 if self.PROMPT_END in tokens else 0
        tokens, probabilities = tokens[first:], probabilities[first:]
        if self.EOS in tokens:
            end = tokens.index(self.EOS)
            tokens, probabilities = tokens[:end], probabilities[:end]
        turns, scores = [], []
        for i in range(0, len(tokens) - 2, 3):
            start, end, label = tokens[i:i + 3]
            if not (self.is_time(start) and self.is_time(end) and end > start):
                continue
            if self.is_speaker(label):
                speaker = self.letter_of(label)
            elif label == self.noise and keep_noise:
                speaker = NOISE_SPEAKER
            else:
                continue
            turns.append(Turn(round(self.time_of(start), 6), round(self.time_of(end), 6), speaker))
            scores.append(probabilities[i + 2])
        return turns, scores

    # --- checkpoint compatibility --------------------------------------------------------------
    def spec(self) -> dict:
        """Everything that fixes the meaning of token ids; stored in checkpoints and compared on load."""
        return {"version": TOKENIZER_VERSION, **asdict(self.config), "vocab_size": self.vocab_size}

    @classmethod
    def from_spec(cls, spec: dict) -> "Tokenizer":
        if spec.get("version") != TOKENIZER_VERSION:
            raise NanodrzError(
                f"checkpoint tokenizer version {spec.get('version')!r} is not {TOKENIZER_VERSION}; "
                "this checkpoint was made by another nanodrz version")
        fields = {k: spec[k] for k in ("time_resolution", "max_seconds", "num_speakers", "noise_token") if k in spec}
        tokenizer = cls(from_dict(TokenizerConfig, fields, "checkpoint tokenizer"))
        if tokenizer.spec() != spec:
            raise NanodrzError("checkpoint tokenizer spec does not match this nanodrz version's vocabulary")
        return tokenizer
