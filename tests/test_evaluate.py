"""DER/JER scoring against numbers computed by hand, file handling, and the `nanodrz evaluate` command."""

from __future__ import annotations

import json

import pytest

from nanodrz import cli
from nanodrz.annotation import Turn, write_rttm
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import label_consistency, load_turns, read_uem, score

# Reference: A speaks 0-10 s, B 10-20 s.
REFERENCE = [Turn(0, 10, "A"), Turn(10, 20, "B")]
# Hypothesis: x misses 0-2 s (2 s missed), y adds 5-6 s on top of A (1 s false alarm),
# x keeps talking 17-20 s over B (3 s confusion). x maps to A, y to B.
HYPOTHESIS = [Turn(2, 10, "x"), Turn(5, 6, "y"), Turn(10, 17, "y"), Turn(17, 20, "x")]


def test_der_components_at_collar_zero_match_hand_count():
    report = score({"f": REFERENCE}, {"f": HYPOTHESIS}, collars=[0.0])
    der = report.files[0].at(0.0)
    assert der.scored == pytest.approx(20.0)
    assert der.missed == pytest.approx(2.0)
    assert der.false_alarm == pytest.approx(1.0)
    assert der.confusion == pytest.approx(3.0)
    assert der.der == pytest.approx(6.0 / 20.0)
    assert report.der(0.0) == pytest.approx(0.30)


def test_collar_forgives_that_many_seconds_each_side_of_reference_boundaries():
    # Boundaries at 0, 10, 20 s: scored region [0.25, 9.75] + [10.25, 19.75] = 19 s.
    # missed [0.25, 2] = 1.75 s, false alarm [5, 6] = 1 s, confusion [17, 19.75] = 2.75 s.
    der = score({"f": REFERENCE}, {"f": HYPOTHESIS}, collars=[0.25]).files[0].at(0.25)
    assert der.scored == pytest.approx(19.0)
    assert der.missed == pytest.approx(1.75)
    assert der.false_alarm == pytest.approx(1.0)
    assert der.confusion == pytest.approx(2.75)
    assert der.der == pytest.approx(5.5 / 19.0)


def test_jer_matches_hand_count():
    # A: union [0,10], 2 s missed -> 0.2. B: union [8,20] = 12 s, 2 s false alarm -> 1/6.
    # C has no system speaker -> 1. JER = mean over reference speakers.
    reference = [Turn(0, 10, "A"), Turn(10, 20, "B"), Turn(20, 25, "C")]
    hypothesis = [Turn(0, 8, "x"), Turn(8, 20, "y")]
    report = score({"f": reference}, {"f": hypothesis})
    assert report.files[0].jer == pytest.approx((0.2 + 1 / 6 + 1.0) / 3)


def test_speaker_labels_do_not_matter():
    renamed = {"x": "SPEAKER_07", "y": "A"}
    relabelled = [Turn(t.start, t.end, renamed[t.speaker]) for t in HYPOTHESIS]
    original = score({"f": REFERENCE}, {"f": HYPOTHESIS})
    permuted = score({"f": [Turn(t.start, t.end, t.speaker.lower()) for t in REFERENCE]}, {"f": relabelled})
    assert permuted.total == original.total


def test_totals_accumulate_errors_over_files_not_percentages():
    references = {
        "short": [Turn(0, 10, "A")],
        "long": [Turn(0, 30, "A"), Turn(30, 40, "B")],
    }
    hypotheses = {"long": [Turn(0, 30, "p"), Turn(30, 40, "q")], "stray": [Turn(0, 5, "z")]}
    report = score(references, hypotheses)
    by_uri = {row.uri: row for row in report.files}
    assert by_uri["short"].hypothesis_missing
    assert by_uri["short"].at(0.0).der == pytest.approx(1.0)
    assert by_uri["short"].at(0.0).missed == pytest.approx(10.0)
    assert by_uri["long"].at(0.0).der == pytest.approx(0.0)
    # Accumulated: 10 s missed of 50 s (an average of percentages would give 50 %).
    assert report.der(0.0) == pytest.approx(0.2)
    assert report.total.at(0.0).missed == pytest.approx(10.0)
    assert report.total.speech == pytest.approx(50.0)
    # JER accumulates over reference speakers: (1 + 0 + 0) / 3.
    assert report.total.jer == pytest.approx(1 / 3)
    assert report.missing_hypotheses == ("short",)
    assert report.unmatched_hypotheses == ("stray",)


def test_default_uem_ends_at_last_reference_turn_and_uem_file_overrides(tmp_path):
    beyond_reference = HYPOTHESIS + [Turn(20, 25, "y")]
    assert score({"f": REFERENCE}, {"f": beyond_reference}).der(0.0) == pytest.approx(0.30)
    uem_file = tmp_path / "f.uem"
    uem_file.write_text("f 1 0.0 10.0\n")
    # Only A's 10 s: 2 s missed + 1 s false alarm.
    assert score({"f": REFERENCE}, {"f": HYPOTHESIS}, uem=read_uem(uem_file)).der(0.0) == pytest.approx(0.30)
    uem_file.write_text("f 1 0.0 30.0\n")
    # Up to 30 s the extra 5 s of y count as false alarm: (2 + 6 + 3) / 20.
    assert score({"f": REFERENCE}, {"f": beyond_reference}, uem=read_uem(uem_file)).der(0.0) == pytest.approx(11 / 20)


def test_load_turns_reads_one_rttm_or_a_directory(tmp_path):
    write_rttm(tmp_path / "all.rttm", {"a": REFERENCE, "b": HYPOTHESIS})
    assert set(load_turns(tmp_path / "all.rttm", "reference")) == {"a", "b"}
    directory = tmp_path / "dir"
    write_rttm(directory / "a.rttm", {"a": REFERENCE})
    (directory / "silent.rttm").write_text("")
    loaded = load_turns(directory, "hypothesis")
    assert loaded == {"a": REFERENCE, "silent": []}
    write_rttm(directory / "again.rttm", {"a": HYPOTHESIS})
    with pytest.raises(NanodrzError, match="in both"):
        load_turns(directory, "hypothesis")


def run_cli(argv, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"evaluate": cli.COMMANDS["evaluate"]})
    return cli.main(["evaluate", *argv])


def test_cli_prints_aligned_table_and_writes_json(tmp_path, monkeypatch, capsys):
    write_rttm(tmp_path / "ref.rttm", {"conv1": REFERENCE, "conv2": REFERENCE})
    write_rttm(tmp_path / "hyp" / "conv1.rttm", {"conv1": HYPOTHESIS})
    out = tmp_path / "scores" / "der.json"
    status = run_cli(["--ref", str(tmp_path / "ref.rttm"), "--hyp", str(tmp_path / "hyp"), "--json", str(out)], monkeypatch)
    captured = capsys.readouterr()
    assert status == 0
    assert "conv2" in captured.err and "all missed" in captured.err
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("file"))
    rows = [line for line in lines if line.startswith(("conv1", "conv2", "TOTAL"))]
    assert len(rows) == 3 and all(len(row) == len(header) for row in rows)
    assert rows[0].split()[1:5] == ["30.00", "10.00", "5.00", "15.00"]
    assert rows[2].split()[1] == "65.00"  # (6 + 20) s of errors over 40 s
    data = json.loads(out.read_text())
    assert data["total"]["der"][0]["der"] == pytest.approx(26 / 40)
    assert data["total"]["der"][1]["collar"] == 0.25
    assert [row["uri"] for row in data["files"]] == ["conv1", "conv2"]
    assert data["missing_hypotheses"] == ["conv2"]


@pytest.mark.parametrize(
    "case",
    ["missing_ref", "missing_hyp", "malformed_rttm", "empty_dir", "no_speaker_lines", "bad_uem", "binary_uem",
     "backwards_uem", "uem_lacks_file", "negative_collar"],
)
def test_bad_inputs_are_one_line_errors_with_status_2(case, tmp_path, monkeypatch, capsys):
    ref, hyp = tmp_path / "ref.rttm", tmp_path / "hyp.rttm"
    write_rttm(ref, {"f": REFERENCE})
    write_rttm(hyp, {"f": HYPOTHESIS})
    extra = []
    if case == "missing_ref":
        ref = tmp_path / "nowhere.rttm"
    elif case == "missing_hyp":
        hyp = tmp_path / "nowhere"
    elif case == "malformed_rttm":
        hyp.write_text("SPEAKER f 1 zero 1.0 <NA> <NA> x <NA> <NA>\n")
    elif case == "empty_dir":
        hyp = tmp_path / "empty"
        hyp.mkdir()
    elif case == "no_speaker_lines":
        ref.write_text("just some text\n")
    elif case == "bad_uem":
        (tmp_path / "u.uem").write_text("f 1 10.0\n")
        extra = ["--uem", str(tmp_path / "u.uem")]
    elif case == "binary_uem":
        (tmp_path / "u.uem").write_bytes(b"f 1 0.0 10.0\n\0\1")
        extra = ["--uem", str(tmp_path / "u.uem")]
    elif case == "backwards_uem":
        (tmp_path / "u.uem").write_text("f 1 10.0 5.0\n")
        extra = ["--uem", str(tmp_path / "u.uem")]
    elif case == "uem_lacks_file":
        (tmp_path / "u.uem").write_text("other 1 0.0 10.0\n")
        extra = ["--uem", str(tmp_path / "u.uem")]
    elif case == "negative_collar":
        extra = ["--collar", "-0.5"]
    status = run_cli(["--ref", str(ref), "--hyp", str(hyp), *extra], monkeypatch)
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("nanodrz evaluate: error: ")
    assert len(captured.err.strip().splitlines()) == 1


def test_label_consistency_counts_time_after_a_label_swap_as_inconsistent():
    reference = [Turn(10.0 * i, 10.0 * i + 9.0, "x" if i % 2 == 0 else "y") for i in range(12)]
    kept = [Turn(t.start, t.end, {"x": "A", "y": "B"}[t.speaker]) for t in reference]
    assert label_consistency(reference, kept) == (108.0, 108.0)
    # From 60 s on, the system calls x "B" and y "A": the file-wide mapping keeps one half, loses the other.
    swapped = [Turn(t.start, t.end, ({"x": "A", "y": "B"} if t.start < 60 else {"x": "B", "y": "A"})[t.speaker])
               for t in reference]
    assert label_consistency(reference, swapped) == (54.0, 108.0)
    # One window covering the whole file is consistent by construction; no hypothesis counts nothing.
    assert label_consistency(reference, swapped, window=200.0) == (108.0, 108.0)
    assert label_consistency(reference, []) == (0.0, 0.0)
