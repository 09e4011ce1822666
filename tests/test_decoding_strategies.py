"""Greedy, beam search and nucleus sampling on scripted models whose next-token scores are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nanodrz.annotation import Turn
from nanodrz.decoding import DecodingOptions, decode, rerank_beams
from nanodrz.errors import NanodrzError
from nanodrz.tokenizer import Tokenizer, TokenizerConfig

TOK = Tokenizer(TokenizerConfig(time_resolution=0.1, max_seconds=10.0, num_speakers=4, noise_token=False))


class ScriptedGeneration:
    def __init__(self, rows: int):
        self.history = [[] for _ in range(rows)]
        self.speaker_counts = None  # no overlap head

    def fork(self, rows: torch.Tensor) -> None:
        self.history = [list(self.history[r]) for r in rows.tolist()]

    def rerank(self, rows: torch.Tensor) -> None:
        self.history = [list(self.history[r]) for r in rows.tolist()]


class ScriptedModel(torch.nn.Module):
    """Next-token log-probabilities from `script(history) -> {token: probability}` (the rest ~0)."""

    def __init__(self, script):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = TOK
        self.script = script

    def logits(self, generation: ScriptedGeneration) -> torch.Tensor:
        out = torch.full((len(generation.history), TOK.vocab_size), -30.0)
        for row, history in enumerate(generation.history):
            for token, probability in self.script(history).items():
                out[row, token] = math.log(probability)
        return out

    def prefill(self, audio, audio_lengths, tokens, token_lengths, max_new, frozen=None):
        generation = ScriptedGeneration(audio.shape[0])
        return generation, self.logits(generation), torch.zeros(audio.shape[0], dtype=torch.long)

    def step(self, generation, tokens, pos):
        for row, token in enumerate(tokens.tolist()):
            generation.history[row].append(token)
        return self.logits(generation)


T = TOK.time_token
A, B = TOK.speaker_offset, TOK.speaker_offset + 1
AUDIO = [np.zeros(16000 * 8, dtype=np.float32)]


def sure_path(history):
    path = [T(1.0), T(2.0), A, T(3.0), T(4.0), B, TOK.EOS]
    return {path[len(history)]: 0.95} if len(history) < len(path) else {TOK.EOS: 1.0}


def garden_path(history):
    """Greedy takes the likelier first start (0.5), after which every end is unlikely; the 0.45 start
    leads to a certain answer, so its whole sequence is more probable."""
    if not history:
        return {T(1.0): 0.5, T(2.0): 0.45}
    if history == [T(1.0)]:
        return {T(x / 10): 0.03 - 0.0004 * x for x in range(11, 61)}
    follow = {1: {T(3.0): 0.99}, 2: {A: 0.99}}
    return follow.get(len(history), {TOK.EOS: 0.99})


def test_greedy_and_beam_agree_on_an_easy_case():
    model = ScriptedModel(sure_path)
    expected = [Turn(1.0, 2.0, "A"), Turn(3.0, 4.0, "B")]
    for options in (DecodingOptions(), DecodingOptions(strategy="beam", beam_size=3)):
        assert decode(model, AUDIO, None, options)[0].turns == expected


def test_beam_search_finds_the_more_probable_answer_greedy_misses():
    model = ScriptedModel(garden_path)
    greedy = decode(model, AUDIO, None, DecodingOptions())[0].turns
    beam = decode(model, AUDIO, None, DecodingOptions(strategy="beam", beam_size=2))[0].turns
    assert greedy[0].start == pytest.approx(1.0)
    assert beam == [Turn(2.0, 3.0, "A")]


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy():
    model = ScriptedModel(garden_path)
    runs = [decode(model, AUDIO, None, DecodingOptions(strategy="sample", seed=s))[0].turns for s in range(12)]
    assert runs[0] == decode(model, AUDIO, None, DecodingOptions(strategy="sample", seed=0))[0].turns
    assert len({tuple(r) for r in runs}) > 1
    narrow = decode(model, AUDIO, None, DecodingOptions(strategy="sample", top_p=1e-6, seed=3))[0].turns
    assert narrow == decode(model, AUDIO, None, DecodingOptions())[0].turns


def test_min_speakers_refuses_an_early_eos():
    model = ScriptedModel(lambda history: {TOK.EOS: 0.9, T(1.0 + len(history) / 10): 0.05, B: 0.02, A: 0.01})
    assert decode(model, AUDIO, None, DecodingOptions(eos_penalty=0.0))[0].turns == []
    turns = decode(model, AUDIO, None, DecodingOptions(min_speakers=2, eos_penalty=0.0))[0].turns
    assert len({t.speaker for t in turns}) == 2


def test_rerank_beams_keeps_the_best_continuations():
    scores = torch.tensor([0.0, -1.0])
    logits = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4]]))
    rows, tokens, best = rerank_beams(scores, logits, beam_size=2)
    assert rows.tolist() == [0, 1] and tokens.tolist() == [1, 0]
    assert best.tolist() == pytest.approx([math.log(0.9), -1.0 + math.log(0.6)])


def test_bad_options_are_errors():
    for bad in ({"strategy": "magic"}, {"beam_size": 0}, {"top_p": 0.0}, {"temperature": 0.0}):
        with pytest.raises(NanodrzError):
            DecodingOptions(**bad)


def looping(history):
    """A model stuck on one turn: after each triple it wants the same one again, unless the start has
    moved past 1.0 s, where it writes one more turn and stops."""
    slot = len(history) % 3
    if slot == 0:
        if history and TOK.time_of(history[-3]) > 1.0:
            return {TOK.EOS: 0.9}
        return {T(1.0): 0.9, T(3.0): 0.05, TOK.EOS: 0.01}
    if slot == 1:
        return {T(2.0): 0.9} if history[-1] == T(1.0) else {T(4.0): 0.9}
    return {A: 0.9} if history[-2] == T(1.0) else {B: 0.9}


def test_a_start_is_shared_by_at_most_one_triple_per_speaker_so_loops_move_on():
    for options in (DecodingOptions(max_speakers=2), DecodingOptions(max_speakers=2, strategy="beam", beam_size=2)):
        result = decode(ScriptedModel(looping), AUDIO, None, options)[0]
        assert result.turns == [Turn(1.0, 2.0, "A"), Turn(1.0, 2.0, "A"), Turn(3.0, 4.0, "B")]


def early_stopper(history):
    """Likes to stop after one turn (EOS 0.6), though a second turn is there to write."""
    path = [T(1.0), T(2.0), A, T(3.0), T(4.0), B]
    if len(history) == 3:
        return {TOK.EOS: 0.6, T(3.0): 0.35}
    return {path[len(history)]: 0.95} if len(history) < len(path) else {TOK.EOS: 1.0}


def test_eos_penalty_keeps_a_model_that_stops_early_writing():
    model = ScriptedModel(early_stopper)
    assert decode(model, AUDIO, None, DecodingOptions(eos_penalty=0.0))[0].turns == [Turn(1.0, 2.0, "A")]
    assert decode(model, AUDIO, None, DecodingOptions(eos_penalty=1.0))[0].turns == [Turn(1.0, 2.0, "A"),
                                                                                       Turn(3.0, 4.0, "B")]
    with pytest.raises(NanodrzError, match="eos_penalty"):
        DecodingOptions(eos_penalty=-1.0)
