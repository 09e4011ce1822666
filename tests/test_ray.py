"""`nanodrz ray`: the RTTMs of a local `nanodrz diarize` run, a manifest, re-runs that skip what is done
and redo what a crash left, and bad input as one line before Ray starts.

Ray runs on a local instance of this module's own (two CPUs, no dashboard, no network); the actors load
the tiny untrained checkpoint, since each loads its own model.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from nanodrz.annotation import Turn
from nanodrz.cli import main
from nanodrz.outputs import DiarizeOutput, write_outputs
from nanodrz.parallel import WorkerJob
from nanodrz.params import DiarizationSettings
from nanodrz.ray_jobs import find_inputs, job_key, output_files

ray = pytest.importorskip("ray")

SR = 16000


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this module's own, never a cluster that runs on the machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def errors_and_summary(capsys) -> tuple[list[str], str]:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanodrz ")]
    return [line for line in lines if "error:" in line], lines[-1]


def test_the_local_runs_rttms_and_a_rerun_redoes_only_what_a_crash_left(
        tmp_path, tiny_checkpoint, local_ray, capsys):
    inputs = tmp_path / "in"
    (inputs / "day2").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, seconds in (("a", 7.0), ("b", 3.0), ("day2/c", 5.0), ("day2/d", 4.0)):
        sf.write(inputs / f"{name}.wav", (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
    (inputs / "day2" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    options = ["--model", str(tiny_checkpoint), "--batch-size", "2", "--format", "rttm,exclusive-rttm,json"]
    assert main(["diarize", str(inputs), "--out", str(tmp_path / "local"), *options]) == 1
    local = files(tmp_path / "local")
    capsys.readouterr()

    out = tmp_path / "out"
    command = ["ray", str(inputs), "--out", str(out), "--actors", "2", *options]
    assert main(command) == 1
    errors, summary = errors_and_summary(capsys)
    assert len(errors) == 1 and "broken.wav" in errors[0], errors
    assert "5 files: 4 diarized, 0 already done, 1 failed" in summary
    written = files(out)
    manifest = written.pop("manifest.jsonl").decode()
    assert written == local and any(local.values())
    entries = {entry["name"]: entry for entry in map(json.loads, manifest.splitlines())}
    assert {name: entry["status"] for name, entry in entries.items()} == {
        "a": "done", "b": "done", "day2/broken": "failed", "day2/c": "done", "day2/d": "done"}
    assert sorted(file for entry in entries.values() for file in entry.get("outputs", [])) == sorted(local)
    assert "broken.wav" in entries["day2/broken"]["error"]

    # A crash that lost b's JSON and d's manifest line, and cut the manifest's last line short: again, b
    # and d are redone to the same bytes, the failed file is tried again, and a and c are left as they were.
    (out / "b.json").unlink()
    kept = [line for line in (out / "manifest.jsonl").read_text().splitlines() if '"day2/d"' not in line]
    (out / "manifest.jsonl").write_text("\n".join(kept) + '\n{"name": "day2/c", "sta')
    times = {p: p.stat().st_mtime_ns for p in (*out.glob("a.*"), *out.glob("day2/c.*"))}
    assert main(command) == 1
    assert "5 files: 2 diarized, 2 already done, 1 failed" in errors_and_summary(capsys)[1]
    assert times == {p: p.stat().st_mtime_ns for p in times}
    written = files(out)
    manifest = written.pop("manifest.jsonl").decode().splitlines()
    assert written == local
    # Groups finish in any order on a cluster, so the manifest lines do too.
    assert sorted(json.loads(line)["name"] for line in manifest[-3:]) == ["b", "day2/broken", "day2/d"]


def test_a_model_that_cannot_load_ends_the_run_with_one_line(tmp_path, local_ray, capsys):
    model = tmp_path / "bad.safetensors"
    model.write_bytes(b"not a model")
    sf.write(tmp_path / "a.wav", np.full(SR, 0.1, dtype=np.float32), SR)
    assert main(["ray", str(tmp_path / "a.wav"), "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nanodrz ")]
    assert len(lines) == 1 and "bad.safetensors" in lines[0], lines


def test_inputs_from_globs_folders_and_lists_are_named_by_their_place(tmp_path, monkeypatch):
    for name in ("calls/2024/x.wav", "calls/2025/x.flac", "calls/notes.txt", "more/y.wav", "elsewhere/z.wav"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "more" / "list.txt").write_text(f"# a list\ny.wav\n\n{tmp_path / 'elsewhere/z.wav'}\nmissing.wav\n")
    monkeypatch.chdir(tmp_path)
    found, errors = find_inputs(["calls/**/*", "more/*.wav", "nothing/*.wav", "elsewhere"], [Path("more/list.txt")])
    assert [name for name, _ in found] == ["2024/x", "2025/x", "y", "z", "y", "z"]
    assert all(path.is_absolute() and path.is_file() for _, path in found)
    assert [str(error) for error in errors] == ["nothing/*.wav: matches no audio files",
                                                "more/list.txt:5: missing.wav: no such file"]


def test_the_manifest_names_exactly_the_files_written(tmp_path):
    output = DiarizeOutput("x", (Turn(0.0, 1.0, "A"),), (Turn(0.0, 1.0, "A"),), ("A",), np.zeros((1, 4)))
    formats = {"rttm", "exclusive-rttm", "json", "embeddings"}
    write_outputs("deep/my x", output, tmp_path, formats, plot=True)
    assert sorted(output_files("deep/my x", formats, True)) == sorted(files(tmp_path))


def test_a_file_done_under_other_settings_is_not_done():
    job = WorkerJob(None, "cpu", 1, 8, frozenset({"rttm"}), DiarizationSettings(), {}, {}, 1)
    assert job_key(job) == job_key(replace(job, threads=2, formats=frozenset({"json"})))
    for other in (replace(job, settings=DiarizationSettings(num_speakers=2)), replace(job, batch_size=4),
                  replace(job, changes={"merge.threshold": 0.5}), replace(job, enroll={"ann": np.ones(SR)})):
        assert job_key(other) != job_key(job)


@pytest.mark.parametrize("arguments, needle", [
    ([], "--list FILE"),
    (["a.wav", "--actors", "0"], "--actors"),
    (["a.wav", "--device", "cuda:1"], "--device cuda"),
    (["a.wav", "--format", "srt"], "--format"),
    (["--list", "missing.txt"], "missing.txt"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, arguments, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["ray", *arguments, "--out", "out"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_a_second_run_into_the_same_manifest_is_refused(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.full(SR, 0.1, dtype=np.float32), SR)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "manifest.jsonl", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["ray", str(tmp_path / "a.wav"), "--out", str(tmp_path / "out")]) == 2
    assert "another run" in capsys.readouterr().err


def test_nothing_to_do_needs_no_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # joining it would fail
    sf.write(tmp_path / "a.wav", np.full(SR, 0.1, dtype=np.float32), SR)
    assert main(["ray", str(tmp_path / "empty*.wav"), "--out", str(tmp_path / "out")]) == 1
    errors, summary = errors_and_summary(capsys)
    assert len(errors) == 1 and "matches no audio files" in errors[0] and "0 files" in summary
