"""Sentences for the TTS voices to speak: the installed fortune cookies, cleaned into plain prose.

Fortunes are varied (jokes, quotes, definitions, dialogue), which gives varied prosody. Entries with
code, e-mail addresses, verse layout or ASCII art are dropped; attributions ("-- Author") are cut;
words in capitals are lowered so engines do not spell them out. Each voice gets its own
deterministic draw from the cleaned list.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SKIPPED_FILES = {"ascii-art", "perl", "translate-me"}  # pictures, code, non-English with glosses
MIN_WORDS, MAX_WORDS = 5, 30

_ATTRIBUTION = re.compile(r"^\s*--")
_DIALOGUE_TAG = re.compile(r"^\s*[QA]:\s*")
_NOT_PROSE = re.compile(r"[^A-Za-z0-9 .,;:!?'\"()\-]")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[A-Z\"'(])")
_CAPITALS = re.compile(r"\b[A-Z]{3,}\b")


def clean_entry(entry: str) -> list[str]:
    """Groups of whole sentences (5-30 words) from one fortune, or [] if it is not prose."""
    lines = [_DIALOGUE_TAG.sub("", line) for line in entry.splitlines() if not _ATTRIBUTION.match(line)]
    text = " ".join(line.strip() for line in lines if line.strip())
    text = re.sub(r",? n\.:", ":", re.sub(r"\s*--\s*", ", ", text))
    text = re.sub(r"\s+", " ", text).strip()
    if not text or _NOT_PROSE.search(text):
        return []
    text = _CAPITALS.sub(lambda match: match.group(0).lower(), text)
    chunks: list[list[str]] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        if chunks and len(chunks[-1]) + len(words) <= MAX_WORDS:
            chunks[-1].extend(words)
        else:
            chunks.append(words)
    return [" ".join(words) for words in chunks if MIN_WORDS <= len(words) <= MAX_WORDS]


@functools.lru_cache(maxsize=1)
def sentences(directory: Path = FORTUNES_DIR) -> tuple[str, ...]:
    """Every cleaned text of the fortune files in `directory`, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for path in sorted(directory.glob("*")):
        if path.suffix or path.name in SKIPPED_FILES or not path.is_file():
            continue
        content = path.read_text(encoding="utf-8", errors="replace")
        for entry in content.split("\n%\n"):
            for text in clean_entry(entry):
                seen.setdefault(text)
    return tuple(seen)


def available(directory: Path = FORTUNES_DIR) -> bool:
    return directory.is_dir() and any(directory.glob("fortunes"))


def pick(voice: str, count: int, seed: int, directory: Path = FORTUNES_DIR) -> list[str]:
    """`count` different texts for `voice`: the same voice and seed always get the same texts."""
    pool = sentences(directory)
    digest = hashlib.sha256(f"{seed}:{voice}".encode("utf-8")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    chosen = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i] for i in chosen]
