"""Training examples from conversations: a chunk, optionally preceded by speaker prompt clips.

Long recordings are diarized chunk by chunk; every chunk after the first starts with a few seconds
of each speaker known so far (clip of A, 200 ms silence, clip of B, ..., then the chunk) and the
prompt triples that name them, so the model keeps their letters. Training reproduces that situation
from one simulated conversation that is longer than the chunk:

* the chunk is a random window of the conversation (it may cut turns, as long-form chunks do);
* prompt clips come from single-speaker stretches of the same conversation outside the chunk, so they
  carry the same room, level and noise as the chunk, as they would at inference;
* some chunk speakers are prompted and some are not (they must get new letters after the prompt
  letters), and prompted speakers who do not speak in the chunk act as distractors;
* targets are the chunk's turns shifted by the prompt length.

`nanodrz.prompts` holds the layout shared with long-form inference. `ExampleItems` turns the
samples of the training stream (`nanodrz.stream`) into examples, drawing on each sample's own
generator, so a resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.config import check_positive, check_probability
from nanodrz.errors import ConfigError
from nanodrz.model import pad_audio, pad_values
from nanodrz.simulate import Conversation, fixed_conversations
from nanodrz.simulation_config import SimulationConfig
from nanodrz.prompts import PROMPT_GAP_SECONDS, assemble_prompted_input, single_speaker_stretches
from nanodrz.tokenizer import Encoded, Tokenizer, letter_index

EXAMPLE_STREAM = 2  # keeps chunk/prompt draws of fixed sets apart from the simulator's own streams


@dataclass
class ExampleConfig:
    """How a conversation becomes a training example. Seconds throughout.

    chunk_seconds: range of chunk lengths; prompt_probability: chance an example is prompted;
    prompt_clip_seconds: range of clip lengths (a clip is shorter when its stretch is); min_clip_seconds:
    shortest usable stretch; max_prompt_speakers: most clips per prompt; prompt_speaker_probability:
    chance each chunk speaker with a usable stretch is prompted; distractor_probability: chance each
    speaker absent from the chunk is prompted anyway; stretch_merge_seconds: pauses up to this long
    inside one speaker's speech still count as one stretch; noise_turns: mean number of Pix2Seq noise
    turns (labelled NOISE) per example; eos_weight: loss weight of EOS.
    """

    chunk_seconds: tuple[float, float] = (8.0, 15.0)
    prompt_probability: float = 0.5
    prompt_clip_seconds: tuple[float, float] = (1.5, 4.0)
    min_clip_seconds: float = 1.0
    max_prompt_speakers: int = 4
    prompt_speaker_probability: float = 0.7
    distractor_probability: float = 0.5
    stretch_merge_seconds: float = 0.3
    noise_turns: float = 0.0
    eos_weight: float = 1.0

    def __post_init__(self):
        if not 0 < self.chunk_seconds[0] <= self.chunk_seconds[1]:
            raise ConfigError("chunk_seconds must be an increasing pair of positive numbers")
        if not 0 < self.min_clip_seconds <= self.prompt_clip_seconds[0] <= self.prompt_clip_seconds[1]:
            raise ConfigError("need 0 < min_clip_seconds <= prompt_clip_seconds[0] <= prompt_clip_seconds[1]")
        for name in ("prompt_probability", "prompt_speaker_probability", "distractor_probability"):
            check_probability(name, getattr(self, name))
        if self.max_prompt_speakers < 0:
            raise ConfigError(f"max_prompt_speakers = {self.max_prompt_speakers}: must be non-negative")
        for name in ("stretch_merge_seconds", "noise_turns", "eos_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)


@dataclass
class Example:
    """Model input audio (prompt clips + chunk) and turns in its time axis.

    `prompt` holds one turn per clip, `turns` the chunk's turns (speakers are bank ids), `chunk_start`
    where the chunk begins in `audio`, `noise` the fake spans of sequence augmentation; `chunk_window`
    and `clip_sources` say where chunk and clips were taken from in the conversation.
    """

    audio: np.ndarray
    prompt: list[Turn]
    turns: list[Turn]
    chunk_start: float
    noise: list[tuple[float, float]] = field(default_factory=list)
    chunk_window: tuple[float, float] = (0.0, 0.0)
    clip_sources: list[tuple[float, float]] = field(default_factory=list)

    def encode(self, tokenizer: Tokenizer, eos_weight: float = 1.0) -> Encoded:
        return tokenizer.encode(self.prompt, self.turns, self.noise, eos_weight)


def build_example(conversation: Conversation, config: ExampleConfig, max_seconds: float,
                  rng: np.random.Generator) -> Example:
    """Cut a chunk of `conversation` and maybe prompt it with clips from outside the chunk."""
    audio = conversation.audio
    duration = len(audio) / SAMPLE_RATE
    chunk_length = min(float(rng.uniform(*config.chunk_seconds)), duration, max_seconds)
    chunk_start = float(rng.uniform(0.0, duration - chunk_length))
    window = (chunk_start, chunk_start + chunk_length)
    chunk_turns = [Turn(max(t.start, window[0]) - window[0], min(t.end, window[1]) - window[0], t.speaker)
                   for t in conversation.turns if t.end > window[0] and t.start < window[1]]
    prompted = rng.random() < config.prompt_probability
    clips: list[tuple[str, tuple[float, float]]] = []
    if prompted:
        in_chunk = set(t.speaker for t in chunk_turns)
        speakers = list(dict.fromkeys(t.speaker for t in conversation.turns))
        budget = max_seconds - chunk_length
        for speaker in [speakers[i] for i in rng.permutation(len(speakers))]:
            wanted = config.prompt_speaker_probability if speaker in in_chunk else config.distractor_probability
            if len(clips) == config.max_prompt_speakers or rng.random() >= wanted:
                continue
            stretches = [s for s in single_speaker_stretches(conversation.turns, speaker, window,
                                                             config.stretch_merge_seconds)
                         if s[1] - s[0] >= config.min_clip_seconds]
            if not stretches:
                continue
            stretch = stretches[int(rng.integers(len(stretches)))]
            length = min(float(rng.uniform(*config.prompt_clip_seconds)), stretch[1] - stretch[0])
            if length + PROMPT_GAP_SECONDS > budget:
                continue
            start = stretch[0] + float(rng.random()) * max(0.0, stretch[1] - stretch[0] - length)
            clips.append((speaker, (start, start + length)))
            budget -= length + PROMPT_GAP_SECONDS
    first, last = (int(round(t * SAMPLE_RATE)) for t in window)
    chunk = audio[first:last]
    clip_audio = [audio[int(round(s * SAMPLE_RATE)):int(round(e * SAMPLE_RATE))] for _, (s, e) in clips]
    model_input, prompt_turns = assemble_prompted_input(clip_audio, chunk)
    offset = (len(model_input) - len(chunk)) / SAMPLE_RATE
    prompt = [Turn(t.start, t.end, speaker) for t, (speaker, _) in zip(prompt_turns, clips)]
    turns = [Turn(t.start + offset, t.end + offset, t.speaker) for t in chunk_turns]
    noise = _noise_spans(turns, offset, offset + chunk_length, config.noise_turns, rng)
    return Example(model_input, prompt, turns, offset, noise, window, [source for _, source in clips])


def _noise_spans(turns: list[Turn], low: float, high: float, mean_count: float,
                 rng: np.random.Generator) -> list[tuple[float, float]]:
    """Pix2Seq-style fake turns: jittered copies of real turns, or random spans, inside the chunk."""
    spans = []
    for _ in range(int(rng.poisson(mean_count)) if mean_count > 0 else 0):
        if turns and rng.random() < 0.5:
            turn = turns[int(rng.integers(len(turns)))]
            shift = rng.normal(0.0, 0.3 * turn.duration, size=2)
            start, end = turn.start + shift[0], turn.end + shift[1]
        else:
            start = float(rng.uniform(low, high))
            end = start + float(rng.uniform(0.2, 3.0))
        start, end = max(start, low), min(end, high)
        if end > start:
            spans.append((float(start), float(end)))
    return spans


# --- model input and targets ---------------------------------------------------------------------
def example_item(example: Example, tokenizer: Tokenizer, eos_weight: float) -> dict[str, Any]:
    """Audio, tokens and weights, plus `spans`: (start, end, letter index) of every prompt clip and turn
    in the input's time axis, the frame-level targets of the activity loss."""
    encoded = example.encode(tokenizer, eos_weight)
    letters = {speaker: letter_index(label) for speaker, label in encoded.letters.items()}
    spans = [(turn.start, turn.end, letters[turn.speaker]) for turn in [*example.prompt, *example.turns]
             if turn.speaker in letters]
    return {"audio": example.audio, "tokens": encoded.tokens, "weights": encoded.weights,
            "spans": np.asarray(spans, dtype=np.float32).reshape(-1, 3)}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad audio with zeros, tokens with PAD, weights with 0 and spans with letter -1; lengths say what is real."""
    audio, audio_lengths = pad_audio([item["audio"] for item in items])
    tokens, token_lengths = pad_values([item["tokens"] for item in items], Tokenizer.PAD, torch.long)
    weights, _ = pad_values([item["weights"] for item in items], 0.0, torch.float32)
    spans = torch.full((len(items), max(max(len(item["spans"]) for item in items), 1), 3), -1.0)
    for row, item in enumerate(items):
        spans[row, :len(item["spans"])] = torch.from_numpy(item["spans"])
    return {"audio": audio, "audio_lengths": audio_lengths, "tokens": tokens, "token_lengths": token_lengths,
            "weights": weights, "spans": spans}


class ExampleItems:
    """The training stream's transform: a conversation cut into an example (`build_example`, drawing on the
    sample's generator), as model input and targets (`example_item`). Picklable, for DataLoader workers."""

    def __init__(self, config: ExampleConfig, tokenizer: Tokenizer):
        self.config, self.tokenizer = config, tokenizer

    def __call__(self, conversation: Conversation, rng: np.random.Generator) -> dict[str, Any]:
        example = build_example(conversation, self.config, self.tokenizer.config.max_seconds, rng)
        return example_item(example, self.tokenizer, self.config.eos_weight)


def fixed_examples(bank: Bank, config: SimulationConfig, examples: ExampleConfig, max_seconds: float,
                   count: int, seed: int) -> list[Example]:
    """The same `count` examples for a given seed (e.g. a validation set): the simulator's fixed
    conversations, each cut and prompted with its own generator."""
    return [build_example(conversation, examples, max_seconds, np.random.default_rng([seed, EXAMPLE_STREAM, i]))
            for i, conversation in enumerate(fixed_conversations(bank, config, count, seed))]
