"""Atomic writes: all or nothing, with ordinary file permissions."""

import os

import pytest

from nanodrz.fileio import atomic_open, write_json


def test_failed_write_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    # A writer killed with SIGKILL never reaches its cleanup: its temporary stays behind.
    code = ("import os, signal, sys\n"
            "from nanodrz.fileio import atomic_open\n"
            "with atomic_open(sys.argv[1]) as handle:\n"
            "    handle.write('half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.rttm")], check=False)
    assert [p.name for p in tmp_path.iterdir()] and not (tmp_path / "x.rttm").exists()
    live = tmp_path / f".x.rttm.{os.getpid()}.abc.tmp"  # this process is alive: not stale
    live.write_text("busy")
    with atomic_open(tmp_path / "x.rttm") as handle:
        handle.write("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.rttm"])
