"""Atomic file writes: a crash or a full disk never leaves a half-written output or checkpoint."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from nanodrz.errors import NanodrzError


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of `path` left by writers that were killed (`kill -9` skips every cleanup).

    A temporary's name carries its writer's process id, so one that belongs to a live process (another
    run writing the same output right now) is left alone.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds.

    Temporaries that earlier, killed writers left next to `path` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that atomically becomes `path` on success."""
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Fail now, with one line, if files cannot be created in `folder` (made if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NanodrzError(f"{what} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise NanodrzError(f"{what} {folder}: cannot write there ({error.strerror or error})") from None


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail now, with one line, if the file `path` cannot be written later."""
    path = Path(path)
    if path.is_dir():
        raise NanodrzError(f"{what} {path}: is a folder, not a file")
    check_writable_folder(path.parent, what)
