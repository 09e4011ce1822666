import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanodrz import cli
from nanodrz.annotation import Turn
from nanodrz.bank import Bank
from nanodrz import train as train_module
from nanodrz.checkpoint import load_checkpoint, load_model, state_path, write_state
from nanodrz.config import load_config
from nanodrz.errors import NanodrzError
from nanodrz.examples import (ExampleConfig, build_example, collate, example_item, single_speaker_stretches)
from nanodrz.prompts import assemble_prompted_input
from nanodrz.simulate import simulate_conversation
from nanodrz.simulation_config import load_preset
from nanodrz.tokenizer import Tokenizer, TokenizerConfig
from nanodrz.train import train, training_stream
from nanodrz.training_config import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SR = 16000


def tiny_config(bank: Path, out: Path, *overrides: str) -> Config:
    return load_config(Config, TINY, [f"data.bank={bank}", f"train.out_dir={out}", *overrides])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


# --- examples ---------------------------------------------------------------------------------------
def test_assemble_prompted_input_layout():
    clips = [np.ones(SR, dtype=np.float32), 2 * np.ones(SR // 2, dtype=np.float32)]
    chunk = 3 * np.ones(2 * SR, dtype=np.float32)
    audio, turns = assemble_prompted_input(clips, chunk)
    assert turns == [Turn(0.0, 1.0, "A"), Turn(1.2, 1.7, "B")]
    assert len(audio) == int(3.9 * SR)
    assert np.all(audio[SR:int(1.2 * SR)] == 0) and np.all(audio[int(1.7 * SR):int(1.9 * SR)] == 0)
    assert np.all(audio[int(1.9 * SR):] == 3)


def test_single_speaker_stretches():
    turns = [Turn(0, 2, "a"), Turn(2.2, 4, "a"), Turn(3, 5, "b"), Turn(6, 9, "a")]
    assert single_speaker_stretches(turns, "a", (7.0, 8.0), merge_gap=0.3) == [(0, 3), (6, 7.0), (8.0, 9)]
    assert single_speaker_stretches(turns, "b", (0.0, 0.0), merge_gap=0.3) == [(4, 5)]


def test_build_example_prompts_from_outside_the_chunk(tiny_bank):
    bank = Bank(tiny_bank, "train")
    simulation = load_preset("clean", ["duration=[20, 30]", "num_speakers=[2, 3]"])
    config = ExampleConfig(chunk_seconds=(5.0, 8.0), prompt_probability=1.0, prompt_clip_seconds=(1.0, 2.0),
                           distractor_probability=1.0, noise_turns=2.0)
    prompted = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        conversation = simulate_conversation(bank, simulation, rng)
        example = build_example(conversation, config, 20.0, rng)
        window = example.chunk_window
        offset = example.chunk_start
        chunk = conversation.audio[int(round(window[0] * SR)):int(round(window[1] * SR))]
        np.testing.assert_array_equal(example.audio[-len(chunk):], chunk)
        assert len(example.audio) / SR <= 20.0
        for clip, (start, end) in zip(example.prompt, example.clip_sources):
            assert end <= window[0] or start >= window[1], "prompt clips come from outside the chunk"
            active = {t.speaker for t in conversation.turns if t.start < end and t.end > start}
            assert active == {clip.speaker}, "a clip holds one speaker"
            clip_audio = example.audio[int(round(clip.start * SR)):int(round(clip.end * SR))]
            source = conversation.audio[int(round(start * SR)):int(round(end * SR))]
            np.testing.assert_array_equal(clip_audio, source)
        expected = sorted((max(t.start, window[0]) - window[0] + offset, min(t.end, window[1]) - window[0] + offset,
                           t.speaker) for t in conversation.turns if t.end > window[0] and t.start < window[1])
        got = sorted((t.start, t.end, t.speaker) for t in example.turns)
        assert [g[2] for g in got] == [e[2] for e in expected]
        np.testing.assert_allclose([g[:2] for g in got], [e[:2] for e in expected], atol=1e-9)
        assert all(offset <= s < e <= offset + (window[1] - window[0]) + 1e-9 for s, e in example.noise)
        prompted += bool(example.prompt)
        example.encode(Tokenizer(TokenizerConfig(max_seconds=20.0)))
    assert prompted >= 3


def test_training_stream_is_the_same_for_any_worker_count_and_resumes(tiny_bank):
    config = tiny_config(tiny_bank, Path("unused"), "train.batch_size=2", "train.seed=5")
    tokenizer = Tokenizer(config.tokenizer)

    def batches(workers: int, start: int, count: int) -> list[dict]:
        stream = training_stream(config, tokenizer, start_batch=start)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    serial = batches(0, 0, 4)
    parallel = batches(2, 0, 4)
    resumed = batches(0, 2, 2)
    for a, b in zip(serial, parallel):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["tokens"], b["tokens"])
    for a, b in zip(serial[2:], resumed):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["tokens"], b["tokens"])
    assert not torch.equal(serial[0]["tokens"], serial[1]["tokens"])


# --- training -----------------------------------------------------------------------------------------
def test_tiny_training_run_learns_and_writes_its_outputs(tiny_bank, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_config(tiny_bank, run_dir, "train.steps=30", "train.eval_interval=30"))
    losses = list(train_losses(run_dir).values())
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for name in ("last.safetensors", "last.state.safetensors", "best.safetensors", "loss_curve.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    assert 0.0 <= result["val_der"] and "val_der_clean" in result and "val_prompted_ier" in result
    model = load_model(run_dir / "best.safetensors")
    assert model.tokenizer.spec() == Tokenizer(tiny_config(tiny_bank, run_dir).tokenizer).spec()


def test_a_new_head_grows_from_a_run_without_one_at_its_own_learning_rate(tiny_bank, tmp_path, capsys):
    plain, grown = tmp_path / "plain", tmp_path / "grown"
    train(tiny_config(tiny_bank, plain, "train.steps=2", "train.eval_interval=2"))
    train(tiny_config(tiny_bank, grown, "train.steps=3", "train.eval_interval=3", "model.overlap_head=true",
                      "optim.new_lr_scale=10", f"train.init_from={plain / 'last.safetensors'}"))
    model = load_model(grown)
    new = [name for name, _ in model.named_parameters() if name.startswith("speaker_count.")]
    copied = len(model.state_dict()) - len(new)
    assert f"{copied} of {len(model.state_dict())} tensors copied" in capsys.readouterr().out
    state = load_checkpoint(grown / "last.safetensors", with_state=True).state
    assert state["new_parameters"] == new
    base_lrs = sorted(state["scheduler"]["base_lrs"])
    assert len(base_lrs) == 4 and base_lrs[-1] == pytest.approx(10 * base_lrs[0])
    assert len([r for r in metrics(grown) if "speaker_count_loss" in r and "loss" in r]) == 3


def test_freeze_loaded_trains_only_the_grown_parameters(tiny_bank, tmp_path):
    plain, grown = tmp_path / "plain", tmp_path / "grown"
    train(tiny_config(tiny_bank, plain, "train.steps=2", "train.eval_interval=2"))
    train(tiny_config(tiny_bank, grown, "train.steps=4", "train.eval_interval=4", "model.time_pointer=true",
                      "optim.freeze_loaded=true", f"train.init_from={plain / 'last.safetensors'}"))
    before, after = load_model(plain).state_dict(), load_model(grown).state_dict()
    assert set(after) - set(before) == {"pointer_query.weight", "pointer_key.weight"}
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert after["pointer_query.weight"].abs().max() > 0
    with pytest.raises(NanodrzError, match="freeze_loaded"):
        train(tiny_config(tiny_bank, tmp_path / "alone", "train.steps=2", "optim.freeze_loaded=true"))


def test_overlap_head_grown_on_a_frozen_model_learns_and_is_validated(tiny_bank, tmp_path):
    plain, grown = tmp_path / "plain", tmp_path / "grown"
    train(tiny_config(tiny_bank, plain, "train.steps=2", "train.eval_interval=2"))
    train(tiny_config(tiny_bank, grown, "train.steps=30", "train.eval_interval=30", "model.overlap_head=true",
                      "optim.freeze_loaded=true", "optim.lr=0.003", f"train.init_from={plain / 'last.safetensors'}"))
    before, after = load_model(plain).state_dict(), load_model(grown).state_dict()
    assert {name.split(".")[0] for name in set(after) - set(before)} == {"speaker_count"}
    assert all(torch.equal(before[name], after[name]) for name in before)
    records = metrics(grown)
    counts = [r["speaker_count_loss"] for r in records if "speaker_count_loss" in r]
    assert len(counts) == 30 and np.mean(counts[-5:]) < 0.8 * np.mean(counts[:5])
    [validation] = [r for r in records if "val_speaker_count_loss" in r]
    assert 0.0 <= validation["val_overlap_precision"] <= 1.0 and 0.0 <= validation["val_overlap_recall"] <= 1.0


def test_example_spans_carry_the_letters_of_the_tokens(tiny_bank):
    tokenizer = Tokenizer(TokenizerConfig(time_resolution=0.04, max_seconds=12, num_speakers=4))
    config = ExampleConfig(chunk_seconds=(4.0, 6.0), prompt_probability=1.0, prompt_clip_seconds=(1.0, 2.0))
    rng = np.random.default_rng(4)
    conversation = simulate_conversation(Bank(tiny_bank, "train"), load_preset("clean"), rng)
    example = build_example(conversation, config, 12, rng)
    item = example_item(example, tokenizer, 1.0)
    decoded = tokenizer.decode(item["tokens"])
    spans = [(round(s, 2), round(e, 2), "ABCD"[int(k)]) for s, e, k in item["spans"][len(example.prompt):]]
    assert {letter for _, _, letter in spans} == {turn.speaker for turn in decoded}
    assert [letter for _, _, letter in [tuple(x) for x in item["spans"][:len(example.prompt)]]] == list(
        range(len(example.prompt)))
    batch = collate([item, example_item(example, tokenizer, 1.0) | {"spans": item["spans"][:1]}])
    assert batch["spans"].shape == (2, len(item["spans"]), 3) and (batch["spans"][1, 1:, 2] == -1).all()


def test_resumed_run_repeats_the_uninterrupted_one(tiny_bank, tmp_path):
    common = ("train.steps=6", "train.eval_interval=4", "train.checkpoint_interval=100", "data.examples.noise_turns=1",
              "model.dropout=0.1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_config(tiny_bank, whole, *common))
    train(tiny_config(tiny_bank, split, *common, "train.stop_at_step=3"))
    assert max(train_losses(split)) == 3
    with pytest.raises(NanodrzError, match="already holds a run"):
        train(tiny_config(tiny_bank, split, *common))
    train(tiny_config(tiny_bank, split, *common), resume=str(split))
    assert train_losses(split) == train_losses(whole)
    with safe_open(str(whole / "last.safetensors"), "pt") as a, safe_open(str(split / "last.safetensors"), "pt") as b:
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_validation_runs_the_pipeline_which_picks_the_best_checkpoint_and_travels_with_it(tiny_bank, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_bank, run_dir, "train.steps=4", "train.eval_interval=2", "data.validation.conversations=2",
                         "data.validation.pipeline.decoding.eos_penalty=2", "data.validation.pipeline.merge.threshold=0.8")
    result = train(config)
    validations = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in validations] == [2, 4]
    for record in validations:
        assert math.isfinite(record["val_pipeline_der"]) and record["val_pipeline_der"] >= 0
        assert record["val_pipeline_der"] == record["val_pipeline_der_clean"]  # the mean over the one preset
        assert "val_der" in record and "val_der_clean" in record  # the per-chunk metrics stay
    best = min(validations, key=lambda r: r["val_pipeline_der"])  # the first of equals, as training keeps it
    assert load_checkpoint(run_dir / "best.safetensors").step == best["step"]
    state = load_checkpoint(run_dir, with_state=True).state
    assert state["best_der"] == best["val_pipeline_der"] and state["best_metric"] == "val_pipeline_der"
    assert result["val_pipeline_der"] == validations[-1]["val_pipeline_der"]
    for name in ("best.safetensors", "last.safetensors"):
        pipeline = load_checkpoint(run_dir / name).pipeline
        assert pipeline == config.data.validation.pipeline
        assert (pipeline.decoding.eos_penalty, pipeline.merge.threshold, pipeline.decoding.max_triples) == (2, 0.8, 12)


def scripted_validation(monkeypatch, per_chunk: list[float], pipeline: list[float]) -> None:
    """Validation that reads out the given DERs in turn (per chunk, pipeline), so which step is best is known."""
    per_chunk, pipeline = iter(per_chunk), iter(pipeline)
    monkeypatch.setattr(train_module, "validate", lambda *args: {"val_loss": 1.0, "val_der": next(per_chunk)})
    monkeypatch.setattr(train_module, "validate_pipeline", lambda *args: {"val_pipeline_der": next(pipeline)})


def test_best_checkpoint_follows_the_pipeline_der_across_a_resume(tiny_bank, tmp_path, monkeypatch):
    common = ("train.steps=6", "train.eval_interval=2", "train.checkpoint_interval=100")
    per_chunk, pipeline = [0.5, 0.1, 0.5], [0.3, 0.5, 0.4]  # per-chunk DER would pick step 4; the pipeline's, 2
    whole, split, older = tmp_path / "whole", tmp_path / "split", tmp_path / "older"
    scripted_validation(monkeypatch, per_chunk, pipeline)
    train(tiny_config(tiny_bank, whole, *common))
    scripted_validation(monkeypatch, per_chunk[:1], pipeline[:1])
    train(tiny_config(tiny_bank, split, *common, "train.stop_at_step=3"))
    shutil.copytree(split, older)
    scripted_validation(monkeypatch, per_chunk[1:], pipeline[1:])
    train(tiny_config(tiny_bank, split, *common), resume=str(split))
    for run_dir in (whole, split):
        assert load_checkpoint(run_dir / "best.safetensors").step == 2
        assert load_checkpoint(run_dir, with_state=True).state["best_der"] == 0.3
    # A state from before the pipeline picked the best holds a per-chunk DER (here a perfect one, which no
    # pipeline DER would beat): the resumed run starts afresh and keeps the best pipeline DER from then on.
    checkpoint = load_checkpoint(older, with_state=True)
    del checkpoint.state["best_metric"]
    checkpoint.state["best_der"] = 0.0
    write_state(state_path(older / "last.safetensors"), checkpoint.step, checkpoint.state)
    scripted_validation(monkeypatch, per_chunk[1:], pipeline[1:])
    train(tiny_config(tiny_bank, older, *common), resume=str(older))
    assert load_checkpoint(older / "best.safetensors").step == 6


def test_checkpoint_problems_are_clear_errors(tiny_bank, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_bank, run_dir, "train.steps=2", "train.eval_interval=100"))
    with pytest.raises(NanodrzError, match="model config differs"):
        train(tiny_config(tiny_bank, tmp_path / "other", "train.steps=4", "model.d_model=64"), resume=str(run_dir))
    with pytest.raises(NanodrzError, match="tokenizer config differs"):
        train(tiny_config(tiny_bank, tmp_path / "other", "train.steps=4", "tokenizer.num_speakers=5"),
              resume=str(run_dir))
    checkpoint = load_checkpoint(run_dir)
    foreign = tmp_path / "foreign.safetensors"
    save_file(checkpoint.weights, str(foreign), metadata={"format": "nanodrz-checkpoint", "version": "0"})
    with pytest.raises(NanodrzError, match="another nanodrz version"):
        load_model(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(NanodrzError, match="not a readable"):
        load_model(garbage)
    with pytest.raises(NanodrzError, match="no checkpoint"):
        load_model(tmp_path / "missing.safetensors")


def test_ddp_with_two_gloo_processes(tiny_bank, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nanodrz.cli", "train", str(TINY),
               "--set", f"data.bank={tiny_bank}", "--set", f"train.out_dir={run_dir}",
               "--set", "train.steps=3", "--set", "train.eval_interval=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert load_checkpoint(run_dir).step == 3


@pytest.mark.parametrize("override, message", [
    ("model.width=3", "unknown key 'width'"),
    ("train.steps=many", "expected an integer"),
    ("data.examples.chunk_seconds=[4, 40]", "may not exceed tokenizer.max_seconds"),
    ("data.stream.num_speakers=[2, 5]", "tokenizer has 4"),
    ("data.split=dev", "unknown split"),
    ("data.examples.prompt_probability=2", "prompt_probability"),
    ("optim.min_lr=1", "min_lr"),
    ("data.validation.eos_penalty=2", "unknown key 'eos_penalty'"),  # now data.validation.pipeline.decoding's
    ("data.validation.pipeline.merge.bogus=1", "unknown key 'bogus'"),
])
def test_config_errors_exit_2(tiny_bank, tmp_path, capsys, override, message):
    code = cli.main(["train", str(TINY), "--set", f"data.bank={tiny_bank}", "--set",
                     f"train.out_dir={tmp_path / 'run'}", "--set", override])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_resume_treats_keys_missing_from_an_older_checkpoint_as_defaults(tiny_bank, tmp_path):
    from nanodrz.config import to_dict
    from nanodrz.run_state import check_resume_compatible

    config = tiny_config(tiny_bank, tmp_path / "run")
    saved = {"model": to_dict(config.model), "tokenizer": to_dict(config.tokenizer)}
    del saved["model"]["activity_head"]  # written before the option existed
    check_resume_compatible(saved, config)
    saved["model"]["d_model"] = 2 * config.model.d_model
    with pytest.raises(NanodrzError, match="model config differs"):
        check_resume_compatible(saved, config)
    with pytest.raises(NanodrzError, match="tokenizer config differs"):
        check_resume_compatible({"model": to_dict(config.model), "tokenizer": {"bogus": 1}}, config)


def test_terminated_run_saves_its_progress(tiny_bank, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "nanodrz.cli", "train", str(TINY), "--set", f"data.bank={tiny_bank}",
               "--set", f"train.out_dir={run_dir}", "--set", "train.steps=100000", "--set", "train.log_interval=1",
               "--set", "train.checkpoint_interval=100000", "--set", "train.eval_interval=100000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(metrics(run_dir)) < 3:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=180)  # a loaded machine can take a while to shut down
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert load_checkpoint(run_dir).step >= 3
