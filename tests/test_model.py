import pytest
import torch

from nanodrz.features import MelFrontEnd, mel_filterbank
from nanodrz.config import from_dict
from nanodrz.errors import NanodrzError
from nanodrz.extras import TimePointer
from nanodrz.model import (DiarizationModel, ModelConfig, TokenContext, attention_mask, sequence_loss,
                           speaker_count_loss, speaker_count_targets)
from nanodrz.tokenizer import Tokenizer, TokenizerConfig

SR = 16000


def make_model(attention: str = "prefix", time_embedding: bool = True, rope_fraction: float = 1.0,
               time_pointer: bool = False) -> DiarizationModel:
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=8.0, num_speakers=4))
    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_mels=40, attention=attention,
                         time_embedding=time_embedding, rope_fraction=rope_fraction, time_pointer=time_pointer)
    model = DiarizationModel(config, tokenizer).eval()
    if time_pointer:  # it starts at zero; make it count
        torch.nn.init.normal_(model.pointer_query.weight, std=0.5)
    return model


def random_batch(generator: torch.Generator, model: DiarizationModel):
    audio = 0.1 * torch.randn(2, 3 * SR, generator=generator)
    audio_lengths = torch.tensor([3 * SR, 2 * SR + 123])
    tokens = torch.randint(model.tokenizer.time_offset, model.tokenizer.vocab_size, (2, 9), generator=generator)
    tokens[:, 0] = model.tokenizer.START
    return audio, audio_lengths, tokens, torch.tensor([9, 6])


def test_mel_filters_are_all_non_empty_and_frames_are_counted():
    assert bool((mel_filterbank(512, 80).sum(0) > 0).all())
    front_end = MelFrontEnd(16, frame_rate=25.0, n_mels=40)
    lengths = torch.tensor([SR, SR + 1, 400, 1])
    features, frames = front_end(torch.randn(4, SR + 1), lengths)
    assert frames.tolist() == front_end.num_frames(lengths).tolist() == [26, 26, 1, 1]
    assert features.shape[1] == 26
    with pytest.raises(ValueError, match="frame_rate"):
        MelFrontEnd(16, frame_rate=30.0)


def test_attention_mask_rules():
    # Two real audio frames and one padded frame, then three tokens (the last one padding).
    pos = torch.tensor([[0, 1, 2, 2, 3, 4]])
    valid = torch.tensor([[True, True, False, True, True, False]])
    audio = torch.tensor([[True, True, True, False, False, False]])
    prefix = attention_mask(pos, pos, valid, audio, prefix=True)[0, 0]
    causal = attention_mask(pos, pos, valid, audio, prefix=False)[0, 0]
    assert prefix[0].tolist() == [True, True, False, False, False, False]  # audio sees later audio
    assert causal[0].tolist() == [True, False, False, False, False, False]
    assert prefix[3].tolist() == [True, True, False, True, False, False]  # tokens: audio + earlier tokens
    assert prefix[4].tolist() == causal[4].tolist() == [True, True, False, True, True, False]
    for mask in (prefix, causal):
        assert bool(mask.any(dim=1).all())  # no empty row, padded slots included
        for padded in (2, 5):  # padded keys are seen by nobody but themselves
            assert mask[:, padded].nonzero().flatten().tolist() == [padded]


def test_future_tokens_do_not_change_earlier_logits():
    model = make_model()
    audio, audio_lengths, tokens, token_lengths = random_batch(torch.Generator().manual_seed(1), model)
    changed = tokens.clone()
    changed[:, 5:] = model.tokenizer.EOS
    with torch.no_grad():
        a = model(audio, audio_lengths, tokens, token_lengths)
        b = model(audio, audio_lengths, changed, token_lengths)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize("attention", ["prefix", "causal"])
def test_late_audio_reaches_early_audio_only_in_prefix_mode(attention):
    model = make_model(attention)
    audio, audio_lengths, tokens, token_lengths = random_batch(torch.Generator().manual_seed(2), model)
    with torch.no_grad():
        token_x = torch.nn.functional.embedding(tokens, model.token_table())
        audio_x, frames, _ = model.embed_audio(audio, audio_lengths)
        changed = audio_x.clone()
        changed[:, 40:] += 1.0
        a = model.hidden(audio_x, frames, token_x, token_lengths)
        b = model.hidden(changed, frames, token_x, token_lengths)
    early_changed = not torch.allclose(a[:, :40], b[:, :40])
    assert early_changed == (attention == "prefix")
    assert not torch.allclose(a[:, -9:], b[:, -9:])  # tokens always see all audio


@pytest.mark.parametrize("attention, rope_fraction, time_pointer",
                         [("prefix", 1.0, False), ("causal", 1.0, False), ("prefix", 0.5, False), ("prefix", 1.0, True)])
def test_padding_does_not_change_results(attention, rope_fraction, time_pointer):
    model = make_model(attention, rope_fraction=rope_fraction, time_pointer=time_pointer)
    audio, audio_lengths, tokens, token_lengths = random_batch(torch.Generator().manual_seed(3), model)
    with torch.no_grad():
        batched = model(audio, audio_lengths, tokens, token_lengths)
        for i in range(2):
            n, m = int(audio_lengths[i]), int(token_lengths[i])
            alone = model(audio[i:i + 1, :n], audio_lengths[i:i + 1], tokens[i:i + 1, :m], token_lengths[i:i + 1])
            torch.testing.assert_close(batched[i, :m], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("time_embedding, rope_fraction, time_pointer",
                         [(True, 1.0, False), (False, 1.0, False), (True, 0.5, False), (True, 1.0, True)])
def test_kv_cache_generation_equals_full_recomputation(time_embedding, rope_fraction, time_pointer):
    model = make_model(time_embedding=time_embedding, rope_fraction=rope_fraction, time_pointer=time_pointer)
    audio, audio_lengths, tokens, _ = random_batch(torch.Generator().manual_seed(4), model)
    prompt_lengths = torch.tensor([3, 1])
    cache, logits, pos = model.prefill(audio, audio_lengths, tokens[:, :3], prompt_lengths, max_new_tokens=6)
    sequences = [tokens[i, :int(prompt_lengths[i])].tolist() for i in range(2)]
    step_logits = []
    for _ in range(6):
        chosen = logits.argmax(-1)
        step_logits.append(logits)
        for i in range(2):
            sequences[i].append(int(chosen[i]))
        logits = model.step(cache, chosen, pos)
        pos = pos + 1
    with torch.no_grad():
        for i in range(2):
            full = model(audio[i:i + 1, :int(audio_lengths[i])], audio_lengths[i:i + 1],
                         torch.tensor([sequences[i]]), torch.tensor([len(sequences[i])]))[0]
            start = int(prompt_lengths[i]) - 1
            for k in range(6):
                torch.testing.assert_close(step_logits[k][i], full[start + k], atol=1e-4, rtol=1e-4)


def test_sequence_loss_counts_weighted_targets_only():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = 10.0  # confident and right about token 1
    tokens = torch.tensor([[0, 2, 3, 4]])
    only_first = sequence_loss(logits, tokens, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert float(only_first) < 1e-3
    all_targets = sequence_loss(logits, tokens, torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    assert float(all_targets) == pytest.approx((2 * torch.log(torch.tensor(5.0))).item() / 3, rel=1e-4)


def test_the_retired_activity_head_is_accepted_only_off():
    assert not from_dict(ModelConfig, {"d_model": 32, "activity_head": False}).activity_head  # as checkpoints stored it
    with pytest.raises(NanodrzError, match="activity_head is retired"):
        from_dict(ModelConfig, {"activity_head": True})


@pytest.mark.parametrize("layers", [1, 3])
def test_speaker_count_head_outputs_one_row_per_audio_frame(layers):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=8.0, num_speakers=4))
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_mels=40, overlap_head=True, overlap_head_layers=layers)
    model = DiarizationModel(config, tokenizer)
    audio, audio_lengths, tokens, token_lengths = random_batch(torch.Generator().manual_seed(1), model)
    logits, heads, frames = model(audio, audio_lengths, tokens, token_lengths, frame_heads=True)
    torch.testing.assert_close(logits, model(audio, audio_lengths, tokens, token_lengths))
    assert set(heads) == {"speaker_count"} and heads["speaker_count"].shape == (2, int(frames.max()), 3)
    assert frames.tolist() == model.front_end.num_frames(audio_lengths).tolist()
    with torch.no_grad():
        generation, _, _ = model.prefill(audio, audio_lengths, tokens, token_lengths, max_new_tokens=3)
    for i, n in enumerate(frames.tolist()):
        torch.testing.assert_close(generation.speaker_counts[i, :n], torch.softmax(heads["speaker_count"][i, :n], -1),
                                   atol=1e-5, rtol=1e-4)
    # Padding does not reach an item's frames (the overlap head's convolution sees neighbours).
    shorter = int(torch.argmin(audio_lengths))
    _, alone, n = model(audio[shorter:shorter + 1, :int(audio_lengths[shorter])], audio_lengths[shorter:shorter + 1],
                        tokens[shorter:shorter + 1, :int(token_lengths[shorter])], token_lengths[shorter:shorter + 1],
                        frame_heads=True)
    torch.testing.assert_close(alone["speaker_count"][0], heads["speaker_count"][shorter, :int(n[0])], atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="no frame-level head"):
        make_model()(audio, audio_lengths, tokens, token_lengths, frame_heads=True)
    with pytest.raises(ValueError, match="overlap_head_layers"):
        ModelConfig(overlap_head=True, overlap_head_layers=0)


def test_speaker_count_targets_and_loss_by_hand():
    # Frames centred at 0, 0.04, ..., 0.2 s: counts 1, 1, 2, 1, 1, 0 from the spans; the last frame is padding.
    spans = torch.tensor([[[0.0, 0.1, 0.0], [0.08, 0.2, 1.0], [-1.0, -1.0, -1.0]]])
    targets = torch.tensor([1, 1, 2, 1, 1, 0])
    assert speaker_count_targets(spans, 6, 25.0)[0].tolist() == targets.tolist()
    # A letter whose spans overlap talks once.
    twice = torch.tensor([[[0.0, 0.1, 0.0], [0.04, 0.2, 0.0]]])
    assert speaker_count_targets(twice, 6, 25.0)[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert float(speaker_count_loss(torch.zeros(1, 6, 3), torch.tensor([6]), spans, 25.0)) == pytest.approx(
        float(torch.log(torch.tensor(3.0))), abs=1e-5)
    confident = torch.nn.functional.one_hot(targets, 3).float() * 40
    assert float(speaker_count_loss(confident[None], torch.tensor([6]), spans, 25.0)) < 1e-6
    wrong_on_padding = confident.clone()
    wrong_on_padding[5] = torch.tensor([0.0, 0.0, 40.0])
    assert float(speaker_count_loss(wrong_on_padding[None], torch.tensor([5]), spans, 25.0)) < 1e-6
    # Three letters at once are still "two or more".
    three = torch.tensor([[[0.0, 0.2, 0.0], [0.0, 0.2, 1.0], [0.0, 0.2, 2.0]]])
    two_or_more = torch.tensor([[0.0, 0.0, 40.0]]).repeat(5, 1)
    assert float(speaker_count_loss(two_or_more[None], torch.tensor([5]), three, 25.0)) < 1e-6


def test_time_pointer_scores_each_time_token_by_the_frame_at_that_time():
    model = make_model(time_pointer=True)
    tok = model.tokenizer
    hidden = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(5))
    audio_hidden = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(6))
    table = torch.zeros(tok.vocab_size, 32)  # no tied-layer logits: only the pointer's are left
    with torch.no_grad():
        pointer = TimePointer.start(model, audio_hidden, frames=torch.tensor([40]))
        out = model.token_logits(hidden, None, TokenContext(table, pointer=pointer))
        expected = model.pointer_query(hidden) @ model.pointer_key(audio_hidden).transpose(1, 2) / 32 ** 0.5
    # 25 frames per second and 40 ms time tokens: time token k is frame k.
    for k in (0, 7, 39):
        torch.testing.assert_close(out[0, :, tok.time_offset + k], expected[0, :, k])
    assert out[0, :, tok.time_offset + 40:tok.speaker_offset].abs().max() == 0  # past the real frames
    assert out[0, :, :tok.time_offset].abs().max() == 0 and out[0, :, tok.speaker_offset:].abs().max() == 0
    assert make_model(time_pointer=True).pointer_query.weight.abs().max() > 0
    fresh = DiarizationModel(model.config, tok)
    assert fresh.pointer_query.weight.abs().max() == 0  # a grown model starts as the same function
