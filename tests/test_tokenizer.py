import numpy as np
import pytest

from nanodrz.annotation import Turn
from nanodrz.config import from_dict
from nanodrz.errors import NanodrzError
from nanodrz.tokenizer import NOISE_SPEAKER, Tokenizer, TokenizerConfig, letter, letter_index


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer(TokenizerConfig(time_resolution=0.02, max_seconds=30.0, num_speakers=4))


def test_vocabulary_ranges_do_not_collide(tok):
    specials = {tok.PAD, tok.EOS, tok.START, tok.PROMPT_END, tok.noise}
    assert len(specials) == 5 and max(specials) < tok.time_offset
    assert tok.num_time_tokens == 1501
    assert tok.time_token(0.0) == tok.time_offset
    assert tok.time_token(30.0) == tok.speaker_offset - 1
    assert tok.time_token(31.0) == tok.speaker_offset - 1
    assert tok.time_token(-0.5) == tok.time_offset
    assert tok.speaker_token("A") == tok.speaker_offset
    assert tok.vocab_size == tok.speaker_offset + 4
    assert tok.is_time(tok.time_token(30.0)) and not tok.is_speaker(tok.time_token(30.0))


def test_round_trip_within_half_a_bin(tok):
    rng = np.random.default_rng(0)
    starts = np.sort(rng.uniform(0, 29, 40))
    turns = [Turn(float(s), float(min(s + rng.uniform(0.1, 3), 30.0)), "AB"[i % 2]) for i, s in enumerate(starts)]
    turns += [Turn(0.0, 0.5, "A"), Turn(29.5, 30.0, "B")]
    decoded = tok.decode(tok.encode([], turns).tokens)
    assert len(decoded) == len(turns)
    for turn, back in zip(sorted(turns, key=lambda t: (round(t.start / 0.02), round(t.end / 0.02))), decoded):
        assert abs(turn.start - back.start) <= 0.01 + 1e-9
        assert abs(turn.end - back.end) <= 0.01 + 1e-9
    assert decoded[0].start == 0.0 and decoded[-1].end == 30.0


def test_order_and_letters_by_first_appearance(tok):
    turns = [Turn(5.0, 6.0, "carol"), Turn(1.0, 3.0, "bob"), Turn(1.0, 2.0, "alice"), Turn(4.0, 7.0, "bob")]
    encoded = tok.encode([], turns)
    assert encoded.letters == {"alice": "A", "bob": "B", "carol": "C"}
    assert [(t.start, t.end, t.speaker) for t in tok.decode(encoded.tokens)] == [
        (1.0, 2.0, "A"), (1.0, 3.0, "B"), (4.0, 7.0, "B"), (5.0, 6.0, "C")]
    assert encoded.tokens[0] == tok.START and encoded.tokens[1] == tok.PROMPT_END and encoded.tokens[-1] == tok.EOS


def test_prompt_speakers_keep_letters_and_carry_no_loss(tok):
    prompt = [Turn(0.0, 2.0, "zed"), Turn(2.2, 4.0, "amy")]
    turns = [Turn(5.0, 6.0, "new"), Turn(6.0, 8.0, "amy")]
    encoded = tok.encode(prompt, turns, eos_weight=0.5)
    assert encoded.letters == {"zed": "A", "amy": "B", "new": "C"}
    end = encoded.tokens.index(tok.PROMPT_END)
    assert end == 1 + 3 * 2
    assert encoded.weights[:end + 1] == [0.0] * (end + 1)
    assert encoded.weights[end + 1:] == [1.0] * 6 + [0.5]
    assert [t.speaker for t in tok.decode(encoded.tokens)] == ["C", "B"]


def test_noise_turns_are_labelled_and_dropped(tok):
    encoded = tok.encode([], [Turn(1.0, 2.0, "x")], noise=[(0.5, 0.9)])
    answer = encoded.tokens[2:-1]
    assert answer[2] == tok.noise and encoded.weights[2:5] == [0.0, 0.0, 1.0]
    assert tok.decode(encoded.tokens) == [Turn(1.0, 2.0, "A")]


def test_degenerate_turns_are_dropped(tok):
    assert tok.decode(tok.encode([], [Turn(1.0, 1.005, "x"), Turn(2.0, 1.0, "y")]).tokens) == []


def test_letters_go_past_z_and_back():
    assert [letter(i) for i in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == \
        ["A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]
    assert all(letter_index(letter(i)) == i for i in range(2000))
    assert [letter_index(label) for label in ("", "a", "A1", "SPEAKER_01")] == [None] * 4
    with pytest.raises(ValueError):
        letter(-1)


def test_turns_carry_label_probabilities_and_optionally_noise(tok):
    encoded = tok.encode([Turn(0.0, 1.0, "p")], [Turn(2.0, 3.0, "x"), Turn(4.0, 5.0, "p")], noise=[(1.5, 1.8)])
    answer = encoded.tokens[encoded.tokens.index(tok.PROMPT_END) + 1:]
    probabilities = [0.5] * (len(encoded.tokens) - len(answer)) + [index / 100 for index in range(len(answer))]
    turns, scores = tok.turns(encoded.tokens, probabilities)
    assert turns == [Turn(2.0, 3.0, "B"), Turn(4.0, 5.0, "A")] and scores == [0.05, 0.08]
    turns, scores = tok.turns(answer + [tok.EOS, *answer], keep_noise=True)
    assert turns == [Turn(1.5, 1.8, NOISE_SPEAKER), Turn(2.0, 3.0, "B"), Turn(4.0, 5.0, "A")]
    assert scores == [1.0, 1.0, 1.0]
    assert tok.decode(encoded.tokens) == tok.turns(encoded.tokens)[0]


def test_speaker_tokens_need_a_letter_of_the_tokenizer(tok):
    assert tok.letter_of(tok.speaker_token("D")) == "D"
    for label in ("E", "AA", "a", "NOISE"):
        with pytest.raises(NanodrzError, match="letters of the tokenizer"):
            tok.speaker_token(label)


def test_too_many_speakers(tok):
    turns = [Turn(i, i + 0.5, f"s{i}") for i in range(5)]
    with pytest.raises(NanodrzError, match="5 speakers"):
        tok.encode([], turns)


def test_spec_round_trip_and_mismatch(tok):
    assert Tokenizer.from_spec(tok.spec()).spec() == tok.spec()
    with pytest.raises(NanodrzError, match="version"):
        Tokenizer.from_spec({**tok.spec(), "version": 99})
    with pytest.raises(NanodrzError, match="does not match"):
        Tokenizer.from_spec({**tok.spec(), "vocab_size": 7})


def test_config_validation():
    with pytest.raises(NanodrzError, match="whole number"):
        from_dict(TokenizerConfig, {"time_resolution": 0.03, "max_seconds": 10.01})
    with pytest.raises(NanodrzError, match="unknown key"):
        from_dict(TokenizerConfig, {"resolution": 0.02})
