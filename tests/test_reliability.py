"""A bad-input corpus, generated at test time: every case ends in one line on stderr and a non-zero exit,
never a traceback, never lost output, never unpickled user files.

The audio cases run in one `nanodrz diarize` call next to good files, as a user with a folder of mixed
recordings would; each bad input must be named in exactly one error line and every good file written.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanodrz import cli
from nanodrz.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SR = 16000


def speechlike(seconds: float, rate: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    return audio[:, 0] if channels == 1 else audio


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_one_clean_line(code: int, stderr: str, expected_code: int = 2) -> str:
    assert code == expected_code
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[list[Path], dict[str, Path]]:
    """(good files, {what: bad input}) in every format and failure the audit found; digital silence is a
    good file whose answer is that nobody speaks."""
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    good = []
    for name, seconds, rate, channels, fmt, subtype in [
        ("mono16k.wav", 6, 16000, 1, "WAV", "PCM_16"), ("stereo44k.wav", 5, 44100, 2, "WAV", "PCM_16"),
        ("six48k.wav", 4, 48000, 6, "WAV", "FLOAT"), ("tel8k.flac", 5, 8000, 1, "FLAC", "PCM_16"),
        ("vorbis.ogg", 4, 22050, 1, "OGG", "VORBIS"), ("mpeg.mp3", 4, 16000, 1, "MP3", "MPEG_LAYER_III"),
        ("stimme_ünïcode 语音.wav", 3, 16000, 1, "WAV", "PCM_16"), ("silent.wav", 2, 16000, 1, "WAV", "PCM_16"),
    ]:
        path = good_dir / name
        audio = speechlike(seconds, rate, channels) * (0 if name == "silent.wav" else 1)
        sf.write(path, audio, rate, format=fmt, subtype=subtype)
        good.append(path)

    bad: dict[str, Path] = {}

    def put(what: str, name: str, data: bytes | np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> None:
        path = bad_dir / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            sf.write(path, data, rate, subtype=subtype)
        bad[what] = path

    put("empty", "empty.wav", b"")
    put("tiny", "tiny.wav", speechlike(0.1))
    nan = speechlike(2)
    nan[100] = np.nan
    put("nan", "nan.wav", nan, subtype="FLOAT")
    inf = speechlike(2)
    inf[5] = np.inf
    put("inf", "inf.wav", inf, subtype="FLOAT")
    put("junk", "junk.wav", b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    put("binary", "program.flac", bytes(range(256)) * 64)
    whole = bad_dir / "whole.wav"
    sf.write(whole, speechlike(4), SR)
    put("truncated wav", "truncated.wav", whole.read_bytes()[:30])
    flac = bad_dir / "whole.flac"
    sf.write(flac, speechlike(4), SR, format="FLAC")
    data = flac.read_bytes()
    flac.unlink()
    whole.unlink()
    put("truncated flac", "cut.flac", data[:60])
    # Intact header, garbage from the first frame on: libsndfile only notices when it decodes.
    first_frame = data.index(b"\xff\xf8")
    put("corrupt first block", "lost-sync.flac", data[:first_frame] + bytes(len(data) - first_frame))
    fifo = bad_dir / "pipe.wav"
    os.mkfifo(fifo)
    bad["fifo"] = fifo
    bad["missing"] = tmp_path / "does-not-exist.wav"
    (tmp_path / "no-audio").mkdir()
    bad["folder without audio"] = tmp_path / "no-audio"
    return good, bad


def test_bad_input_corpus_in_one_call(corpus, tmp_path, tiny_checkpoint, capsys):
    good, bad = corpus
    out = tmp_path / "out"
    code = cli.main(["diarize", *map(str, good), *map(str, bad.values()), "--model", str(tiny_checkpoint),
                     "--out", str(out), "--format", "rttm,json"])
    stderr = capsys.readouterr().err
    assert code == 1, stderr
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == len(bad), errors
    for what, path in bad.items():
        named = [line for line in errors if path.name in line]
        assert len(named) == 1, (what, errors)
    for path in good:
        stem = path.stem.replace(" ", "_")
        assert (out / f"{stem}.rttm").is_file(), stem
        assert json.loads((out / f"{stem}.json").read_text())["uri"] == stem
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_named_pipe_in_a_folder_is_reported_not_opened(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a.wav", speechlike(3), SR)
    os.mkfifo(folder / "b.wav")
    code = cli.main(["diarize", str(folder), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and len(errors) == 1 and "b.wav" in errors[0] and "not a regular file" in errors[0]
    assert (tmp_path / "out" / "a.rttm").is_file()


def test_inputs_with_the_same_name_are_refused_before_any_work(tmp_path, tiny_checkpoint, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sf.write(tmp_path / folder / "x.wav", speechlike(2), SR)
    out = tmp_path / "out"
    code = cli.main(["diarize", str(tmp_path / "a" / "x.wav"), str(tmp_path / "b" / "x.wav"),
                     "--model", str(tiny_checkpoint), "--out", str(out)])
    line = assert_one_clean_line(code, capsys.readouterr().err)
    assert "a/x.wav" in line and "b/x.wav" in line
    assert not list(out.rglob("*.rttm"))


def test_a_folder_keeps_its_layout_under_out(tmp_path, tiny_checkpoint, capsys):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        sf.write(tmp_path / "in" / folder / "x.wav", speechlike(2), SR)
    sf.write(tmp_path / "in" / "x-2.wav", speechlike(2), SR)
    out = tmp_path / "out"
    assert cli.main(["diarize", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.rttm")) == ["a/x.rttm", "b/x.rttm", "x-2.rttm"]


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "eos nan", "threads 0", "encoder threads 0",
                                  "enroll silent"])
def test_arguments_are_checked_before_the_model_loads(tmp_path, capsys, case):
    audio = tmp_path / "a.wav"
    sf.write(audio, speechlike(2), SR)
    (tmp_path / "file").write_text("x")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(SR, dtype=np.float32), SR)
    extra = {"out is a file": ["--out", str(tmp_path / "file")],
             "out under a file": ["--out", str(tmp_path / "file" / "sub")],
             "eos nan": ["--eos-penalty", "nan"],
             "threads 0": ["--threads", "0"],
             "encoder threads 0": ["--encoder-threads", "0"],
             "enroll silent": ["--enroll", f"Ann={silent}"]}[case]
    # A model path that does not exist: reaching the model would give another error.
    code = cli.main(["diarize", str(audio), "--model", str(tmp_path / "no-model.safetensors"), *extra])
    line = assert_one_clean_line(code, capsys.readouterr().err)
    assert "no-model" not in line and "no checkpoint" not in line


# --- evaluate -------------------------------------------------------------------------------------
def rttm(path: Path, uri: str) -> Path:
    path.write_text(f"SPEAKER {uri} 1 0.000 1.000 <NA> <NA> A <NA> <NA>\n")
    return path


@pytest.mark.parametrize("case", ["binary reference", "mismatched reference", "json to a folder",
                                  "json under a file"])
def test_evaluate_refuses_what_it_cannot_score(tmp_path, capsys, case):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.mkdir()
    hyp.mkdir()
    rttm(hyp / "x.rttm", "x")
    rttm(ref / "x.rttm", "x")
    extra = []
    if case == "binary reference":
        (ref / "x.rttm").write_bytes(bytes(range(256)))
    elif case == "mismatched reference":
        (ref / "x.rttm").unlink()
        rttm(ref / "y.rttm", "y")
    elif case == "json to a folder":
        extra = ["--json", str(tmp_path)]
    else:
        (tmp_path / "file").write_text("x")
        extra = ["--json", str(tmp_path / "file" / "scores.json")]
    code = cli.main(["evaluate", "--ref", str(ref), "--hyp", str(hyp), *extra])
    captured = capsys.readouterr()
    assert_one_clean_line(code, captured.err)
    assert captured.out == ""


def test_evaluate_warns_loudly_about_hypotheses_without_reference(tmp_path, capsys):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.mkdir()
    hyp.mkdir()
    rttm(ref / "x.rttm", "x")
    rttm(hyp / "x.rttm", "x")
    rttm(hyp / "z.rttm", "z")
    assert cli.main(["evaluate", "--ref", str(ref), "--hyp", str(hyp)]) == 0
    assert "WARNING" in capsys.readouterr().err


# --- training: configs, checkpoints, state files ------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.lr=-0.001", "optim.lr=.nan", "optim.lr=0", "optim.warmup_steps=-1",
                                      "train.checkpoint_interval=0", "model.n_heads=0", "data.workers=-1",
                                      "train.eval_interval=0", "model.dropout=1.5", "optim.betas=[0.9, 1.0]"])
def test_out_of_range_config_values_exit_2(tmp_path, capsys, override):
    code = cli.main(["train", str(TINY), "--set", f"train.out_dir={tmp_path / 'run'}", "--set", override])
    line = assert_one_clean_line(code, capsys.readouterr().err)
    assert override.split("=")[0].split(".")[-1] in line
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def short_run(tiny_bank, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    code = cli.main(["train", str(TINY), "--set", f"data.bank={tiny_bank}", "--set", f"train.out_dir={run_dir}",
                     "--set", "train.steps=2", "--set", "train.eval_interval=100"])
    assert code == 0
    return run_dir


def resume(tiny_bank: Path, run_dir: Path, *extra: str) -> int:
    return cli.main(["train", str(TINY), "--set", f"data.bank={tiny_bank}", "--set", f"train.out_dir={run_dir}",
                     "--set", "train.steps=3", "--set", "train.eval_interval=100", *extra, "--resume", str(run_dir)])


class RunsCode:
    """Unpickling this creates a file: the proof that a pickle executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_unpickles_an_old_or_crafted_state(tiny_bank, short_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    (short_run / "last.state.safetensors").unlink()
    with open(short_run / "last.state.pt", "wb") as handle:
        pickle.dump({"step": 2, "payload": RunsCode(marker)}, handle)
    line = assert_one_clean_line(resume(tiny_bank, short_run), capsys.readouterr().err)
    assert "convert-training-state" in line
    assert not marker.exists()
    # The converter's restricted loader refuses it too.
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert-training-state.py"),
                                str(short_run / "last.state.pt")], capture_output=True, text=True)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert not marker.exists()


def test_converter_turns_an_old_state_into_one_that_resumes(tiny_bank, short_run, capsys):
    from nanodrz.checkpoint import load_state

    state = load_state(short_run / "last.safetensors", 2)
    (short_run / "last.state.safetensors").unlink()
    torch.save({"format": "nanodrz-checkpoint", "version": 1, "step": 2, **state}, short_run / "last.state.pt")
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert-training-state.py"),
                                str(short_run / "last.state.pt")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert resume(tiny_bank, short_run) == 0
    assert load_checkpoint(short_run).step == 3


def rewrite(path: Path, metadata_change: dict | None = None, tensor_change=None) -> None:
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata.update(metadata_change or {})
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def poison(tensors: dict) -> None:
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


@pytest.mark.parametrize("case", ["no step", "config not json", "config a list", "nan weights", "nan state",
                                  "torn metrics"])
def test_damaged_runs_give_one_line_and_keep_their_checkpoint(tiny_bank, short_run, capsys, case):
    weights, state = short_run / "last.safetensors", short_run / "last.state.safetensors"
    if case == "no step":
        rewrite(weights, {"step": None})
    elif case == "config not json":
        rewrite(weights, {"config": "{not json"})
    elif case == "config a list":
        rewrite(weights, {"config": "[]"})
    elif case == "nan weights":
        rewrite(weights, tensor_change=poison)
    elif case == "nan state":
        rewrite(state, tensor_change=poison)
    else:  # a crash while appending: the last line is cut short; resuming must still work
        with open(short_run / "metrics.jsonl", "a") as handle:
            handle.write('{"step": 2, "lo')
        assert resume(tiny_bank, short_run) == 0
        assert "skipped 1 unreadable line" in capsys.readouterr().err
        lines = (short_run / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line)["step"] <= 3 for line in lines)
        return
    before = weights.read_bytes()
    line = assert_one_clean_line(resume(tiny_bank, short_run), capsys.readouterr().err)
    assert "last." in line
    assert weights.read_bytes() == before


def test_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(tiny_bank, tmp_path, capsys, monkeypatch):
    import nanodrz.train as training

    run_dir = tmp_path / "run"
    real_loss, calls = training.sequence_loss, []

    def loss_that_diverges(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(training, "sequence_loss", loss_that_diverges)
    code = cli.main(["train", str(TINY), "--set", f"data.bank={tiny_bank}", "--set", f"train.out_dir={run_dir}",
                     "--set", "train.steps=5", "--set", "train.checkpoint_interval=2", "--set",
                     "train.eval_interval=100"])
    stderr = capsys.readouterr().err
    [line] = error_lines(stderr)  # the rest is the progress bar
    assert code == 2 and "Traceback" not in stderr
    assert "step 3" in line and "not finite" in line
    checkpoint = load_checkpoint(run_dir, with_state=True)
    assert checkpoint.step == 2
    assert all(torch.isfinite(t).all() for t in checkpoint.weights.values() if t.is_floating_point())
