import numpy as np
import pytest
import torch

from nanodrz.annotation import Turn
from nanodrz.decoding import DecodingOptions, Grammar, decode
from nanodrz.errors import NanodrzError
from nanodrz.model import DiarizationModel, KVCache, ModelConfig
from nanodrz.tokenizer import Tokenizer, TokenizerConfig

SR = 16000


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer(TokenizerConfig(time_resolution=0.5, max_seconds=5.0, num_speakers=3))


def grammar_for(tok: Tokenizer, batch: int = 1, letters: int = 0, max_speakers: int = 3, max_triples: int = 10,
                min_seconds: float = 0.0, max_seconds: float = 5.0) -> Grammar:
    bound = [torch.full((batch,), tok.time_token(seconds)) for seconds in (min_seconds, max_seconds)]
    return Grammar(tok, *bound, torch.full((batch,), letters), max_speakers, max_triples)


def allowed(grammar: Grammar, row: int = 0) -> list[int]:
    """The tokens `grammar.constrain` leaves to row `row` of any logits."""
    logits = torch.zeros(len(grammar.finished), grammar.tokenizer.vocab_size)
    grammar.constrain(logits)
    return torch.isfinite(logits[row]).nonzero().flatten().tolist()


def times(tok: Tokenizer, *seconds: float) -> list[int]:
    return [tok.time_token(s) for s in seconds]


def test_slots_take_start_end_and_speaker_in_turn(tok):
    grammar = grammar_for(tok)
    assert allowed(grammar) == [tok.EOS] + times(tok, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
    grammar.update(torch.tensor([tok.time_token(1.0)]))
    assert allowed(grammar) == times(tok, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    grammar.update(torch.tensor([tok.time_token(2.0)]))
    assert allowed(grammar) == [tok.noise, tok.speaker_token("A")]


def test_finished_items_only_get_eos_at_logit_zero(tok):
    grammar = grammar_for(tok, batch=2)
    grammar.finished[1] = True
    logits = torch.full((2, tok.vocab_size), 3.0)
    grammar.constrain(logits)
    assert logits[1, tok.EOS] == 0 and torch.isfinite(logits[1]).sum() == 1
    assert logits[0, tok.EOS] == 3.0 and torch.isfinite(logits[0]).sum() > 1


def test_starts_do_not_go_back_and_ends_come_after_their_start(tok):
    grammar = grammar_for(tok)
    grammar.last_start[:] = tok.time_token(2.0)
    assert allowed(grammar) == [tok.EOS] + times(tok, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
    grammar.slot, grammar.current_start[:] = 1, tok.time_token(3.0)
    assert allowed(grammar) == times(tok, 3.5, 4.0, 4.5, 5.0)


def test_ties_beyond_one_per_speaker_move_the_start_on_and_a_dead_end_ends(tok):
    grammar = grammar_for(tok, max_speakers=2)
    for token in times(tok, 2.0, 3.0) + [tok.speaker_token("A")] + times(tok, 2.0, 3.0) + [tok.speaker_token("B")]:
        grammar.update(torch.tensor([token]))
    assert int(grammar.ties[0]) == 2
    assert [t for t in allowed(grammar) if tok.is_time(t)][0] == tok.time_token(2.5)
    # Stuck at the last start while a minimum speaker count refuses EOS: EOS all the same.
    grammar.last_start[:] = tok.time_token(5.0) - 1
    grammar.min_speakers = 3
    assert allowed(grammar) == [tok.EOS]


def test_times_stay_inside_the_chunk(tok):
    grammar = grammar_for(tok, min_seconds=1.0, max_seconds=3.0)
    assert allowed(grammar) == [tok.EOS] + times(tok, 1.0, 1.5, 2.0, 2.5)  # a start leaves room for an end
    grammar.update(torch.tensor([tok.time_token(1.0)]))
    assert allowed(grammar) == times(tok, 1.5, 2.0, 2.5, 3.0)


def test_a_new_letter_only_after_the_used_ones_and_at_most_max_speakers(tok):
    grammar = grammar_for(tok, batch=3, max_speakers=2)
    grammar.slot = 2
    grammar.letters_used = torch.tensor([0, 1, 2])
    a, b = tok.speaker_token("A"), tok.speaker_token("B")
    assert [allowed(grammar, row) for row in range(3)] == [[tok.noise, a], [tok.noise, a, b], [tok.noise, a, b]]


def test_min_speakers_refuses_eos_and_max_triples_forces_it(tok):
    grammar = grammar_for(tok, letters=1, max_triples=2)
    grammar.min_speakers = 2
    assert tok.EOS not in allowed(grammar)
    grammar.triples = 2
    assert allowed(grammar) == [tok.EOS]


def test_grammar_tracks_triples(tok):
    grammar = grammar_for(tok, letters=1)
    for token in [tok.time_token(1.0), tok.time_token(2.0), tok.speaker_token("B")]:
        grammar.update(torch.tensor([token]))
    assert grammar.slot == 0 and grammar.triples == 1
    assert int(grammar.letters_used) == 2 and int(grammar.last_start) == tok.time_token(1.0)
    grammar.update(torch.tensor([tok.EOS]))
    assert bool(grammar.finished[0])


def small_model(seed: int = 0) -> DiarizationModel:
    torch.manual_seed(seed)
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.1, max_seconds=6.0, num_speakers=3))
    model = DiarizationModel(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_mels=40), tokenizer)
    # Make the untrained model eager to write turns and new speakers, so the grammar is exercised.
    with torch.no_grad():
        model.token_embedding.weight[tokenizer.EOS] *= 0
        model.token_embedding.weight[tokenizer.noise] *= 0
    return model


def check_well_formed(result, tok, min_time, duration, max_speakers, prompt_letters=0):
    tokens = result.tokens
    assert len(tokens) % 3 == 0
    starts = [tok.time_of(t) for t in tokens[0::3]]
    ends = [tok.time_of(t) for t in tokens[1::3]]
    assert starts == sorted(starts)
    assert all(e > s for s, e in zip(starts, ends))
    assert all(s >= min_time - 1e-9 and e <= duration + tok.resolution / 2 for s, e in zip(starts, ends))
    seen = [chr(ord("A") + i) for i in range(prompt_letters)]
    for label in tokens[2::3]:
        if label == tok.noise:
            continue
        letter = tok.letter_of(label)
        if letter not in seen:
            assert ord(letter) - ord("A") == len(seen), "a new letter must be the next one"
            seen.append(letter)
    assert len(seen) <= max_speakers


def test_decode_is_grammatical_with_and_without_prompts():
    model = small_model()
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(int(s * SR)).astype(np.float32) for s in (4.0, 2.5, 5.5)]
    prompts = [[], [Turn(0.0, 0.8, "x")], [Turn(0.0, 1.0, "p"), Turn(1.2, 2.0, "q")]]
    options = DecodingOptions(max_triples=8, keep_noise=True)
    results = decode(model, audio, prompts, options)
    assert results[2].letters == {"p": "A", "q": "B"}
    for result, a, prompt in zip(results, audio, prompts):
        assert len(result.tokens) <= 3 * 8
        check_well_formed(result, tok, max((t.end for t in prompt), default=0.0), len(a) / SR, 3, len(prompt))
        assert len(result.scores) == len(result.turns) and all(0 < s <= 1 for s in result.scores)
    assert sum(len(r.turns) for r in results) > 0
    capped = decode(model, audio, prompts, DecodingOptions(max_triples=8, max_speakers=1, keep_noise=True))
    for result, a, prompt in zip(capped, audio, prompts):
        check_well_formed(result, tok, max((t.end for t in prompt), default=0.0), len(a) / SR, max(1, len(prompt)),
                          len(prompt))


def test_batched_decode_equals_one_by_one():
    model = small_model(1)
    rng = np.random.default_rng(1)
    audio = [0.1 * rng.standard_normal(int(s * SR)).astype(np.float32) for s in (3.0, 5.0)]
    prompts = [[Turn(0.0, 1.0, "a")], []]
    batched = decode(model, audio, prompts, DecodingOptions(max_triples=5))
    for i in range(2):
        alone = decode(model, audio[i:i + 1], prompts[i:i + 1], DecodingOptions(max_triples=5))[0]
        assert alone.tokens == batched[i].tokens


def test_beam_reranking_copies_only_the_slots_beams_do_not_share():
    """Beams of one input share what was cached before the fork, so re-ranking copies only the slots
    written since: the cache ends up as if every row had been copied whole."""
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(n_layers=2, batch=2, n_heads=1, head_dim=2, capacity=8, device=torch.device("cpu"),
                    dtype=torch.float32)

    def write(slots: slice) -> None:
        for cached in cache.keys + cache.values:
            cached[:, :, slots] = torch.randn(cached[:, :, slots].shape, generator=generator)

    write(cache.append(3, valid=torch.tensor([[True, True, True], [True, True, False]])))
    cache.fork(torch.arange(2).repeat_interleave(3))
    for rows in ([0, 0, 2, 5, 3, 3], [1, 2, 2, 4, 4, 3], [2, 0, 1, 3, 5, 4]):
        write(cache.append(1))
        rows = torch.tensor(rows)
        whole = [cached[rows] for cached in cache.keys + cache.values]
        bias = cache.bias[rows]
        cache.rerank(rows)
        assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, whole))
        assert torch.equal(cache.bias, bias)


def test_decode_rejects_audio_longer_than_the_model():
    model = small_model()
    with pytest.raises(NanodrzError, match="longer than"):
        decode(model, [np.zeros(7 * SR, dtype=np.float32)])


def test_options_are_frozen_and_a_replaced_copy_is_checked_again():
    import dataclasses

    options = DecodingOptions(max_triples=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_speakers = 2
    assert dataclasses.replace(options, max_speakers=2) == DecodingOptions(max_triples=8, max_speakers=2)
    with pytest.raises(NanodrzError, match="eos_penalty"):
        dataclasses.replace(options, eos_penalty=float("nan"))
