"""Where generated data lives by default: $NANODRZ_CACHE, else ~/.cache/nanodrz (never created on import)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("NANODRZ_CACHE") or Path.home() / ".cache" / "nanodrz")


def default_bank_dir() -> Path:
    return cache_dir() / "bank"
