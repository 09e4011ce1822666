"""Who says which utterance slice when: the turn-taking layout of one simulated conversation.

The model follows the spirit of Landini et al. (2022, "From simulated mixtures to simulated
conversations") and NeMo's speech_data_simulator: the same speaker goes on after a pause, another
speaker takes over after a gap or interrupts (starts before the current turn ends), and listeners drop
short backchannels into the current speaker's turn. Only times are planned here; `simulate` renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nanodrz.bank import Bank
from nanodrz.errors import NanodrzError
from nanodrz.simulation_config import TurnTakingConfig


@dataclass
class Piece:
    """A slice of one utterance placed in the conversation (times in seconds)."""

    speaker: int  # index among the conversation's speakers
    utterance: int
    source_start: float  # where the slice starts in the utterance
    source_end: float
    start: float  # where it starts in the conversation
    regions: np.ndarray  # (K, 2) speech regions relative to source_start, within the slice
    kind: str  # "turn", "interruption" or "backchannel"


def choose_speakers(bank: Bank, count: int, rng: np.random.Generator) -> list[int]:
    """`count` bank speakers, with distinct base voices whenever the split has enough of them."""
    order = rng.permutation(bank.num_speakers)
    chosen: list[int] = []
    bases: set[str] = set()
    for index in order:
        info = bank.speakers[index]
        base = info.base or info.speaker
        if base not in bases:
            chosen.append(int(index))
            bases.add(base)
            if len(chosen) == count:
                return chosen
    chosen += [int(i) for i in order if int(i) not in chosen][: count - len(chosen)]
    return chosen


class Planner:
    """Lays out one conversation: which utterance slice each speaker says, and when.

    Every speaker's first turn comes within the first `len(speakers)` turns and is short enough to
    fit, so the requested speaker count always shows up in the reference. The "frontier" is the
    latest end of any turn so far; the next turn starts a pause or gap after it, or an overlap
    before it (an interruption).
    """

    def __init__(self, bank: Bank, speakers: list[int], duration: float, turns: TurnTakingConfig,
                 rng: np.random.Generator):
        self.bank, self.speakers, self.duration, self.turns, self.rng = bank, speakers, duration, turns, rng
        self.count = len(speakers)
        self.weights = rng.dirichlet(np.full(self.count, turns.dominance)) if self.count > 1 else np.ones(1)
        self.introductions = rng.permutation(self.count)
        self.lead = min(float(rng.uniform(*turns.lead_silence_seconds)), 0.2 * duration)
        self.budget = (duration - self.lead) / self.count  # time each speaker's first turn may use
        self.busy_until = np.full(self.count, -np.inf)
        self.frontier, self.frontier_length, self.last = self.lead, 0.0, -1
        self.activity = _Activity(duration)
        self.pieces: list[Piece] = []

    def plan(self) -> list[Piece]:
        turns, rng = self.turns, self.rng
        index = 0
        while True:
            introducing = index < self.count
            speaker = int(self.introductions[index]) if introducing else self._next_speaker()
            cap = 0.6 * self.budget if introducing else turns.max_turn_seconds
            target = min(float(rng.exponential(turns.turn_seconds)), cap)
            utterance, source_start, source_end, regions = _pick_slice(self.bank, self.speakers[speaker], target,
                                                                       cap, rng)
            length = source_end - source_start
            max_silence = turns.max_silence_seconds
            if introducing:
                max_silence = min(max_silence, 0.3 * self.budget)
            if index == 0:
                start = self.lead
            elif speaker == self.last:
                start = self.frontier + min(float(rng.exponential(turns.pause_seconds)), max_silence)
            else:
                start = self._speaker_change_start(length, regions, max_silence)
            start = max(start, self.busy_until[speaker] + turns.same_speaker_gap_seconds)
            if start >= self.duration:
                return self.pieces
            kind = "interruption" if index and start < self.frontier else "turn"
            self._place(Piece(speaker, utterance, source_start, source_end, start, regions, kind))
            if start + length > self.frontier:
                self.frontier, self.frontier_length = start + length, length
            self.last = speaker
            self._add_backchannels(speaker, start, length)
            index += 1

    def _next_speaker(self) -> int:
        """The same speaker again, or another one drawn by their share of the conversation."""
        if self.count == 1 or self.rng.random() >= self.turns.speaker_change_probability:
            return self.last
        others = self.weights.copy()
        others[self.last] = 0.0
        chosen = int(np.searchsorted(np.cumsum(others), self.rng.random() * others.sum(), side="right"))
        return min(chosen, self.count - 1)

    def _speaker_change_start(self, length: float, regions: np.ndarray, max_silence: float) -> float:
        """Start of another speaker's turn: a gap after the frontier, or an overlap before it."""
        turns = self.turns
        overlap = float(self.rng.exponential(turns.overlap_seconds))
        if turns.target_overlap_ratio is not None:
            speech = float(np.sum(regions[:, 1] - regions[:, 0]))
            overlap = self.activity.overlap_deficit(turns.target_overlap_ratio, speech)
            interrupt = overlap > 0
        else:
            interrupt = self.rng.random() < turns.interruption_probability
        if interrupt:
            return self.frontier - min(overlap, 0.9 * min(self.frontier_length, length))
        return self.frontier + min(float(self.rng.exponential(turns.gap_seconds)), max_silence)

    def _add_backchannels(self, speaker: int, start: float, length: float) -> None:
        """Short slices by listeners, placed inside the turn just planned."""
        rate = self.turns.backchannels_per_minute
        if self.count == 1 or rate <= 0:
            return
        for _ in range(int(self.rng.poisson(rate / 60.0 * length))):
            listener = int(self.rng.integers(self.count - 1))
            listener += listener >= speaker
            wanted = float(self.rng.uniform(*self.turns.backchannel_seconds))
            utterance, source_start, source_end, regions = _pick_slice(
                self.bank, self.speakers[listener], wanted, wanted, self.rng)
            earliest = max(start + 0.2 * length, self.busy_until[listener] + self.turns.same_speaker_gap_seconds)
            latest = start + length - (source_end - source_start) - 0.1
            if latest > earliest:
                at = float(self.rng.uniform(earliest, latest))
                self._place(Piece(listener, utterance, source_start, source_end, at, regions, "backchannel"))

    def _place(self, piece: Piece) -> None:
        self.pieces.append(piece)
        self.busy_until[piece.speaker] = piece.start + piece.source_end - piece.source_start
        self.activity.add(piece.start, piece.regions)


class _Activity:
    """Running count of speech and overlapped speech on a 10 ms grid, to steer towards an overlap ratio."""

    def __init__(self, duration: float):
        self.counts = np.zeros(int(math.ceil(duration * 100)) + 1, dtype=np.int16)
        self.speech = 0
        self.overlap = 0

    def add(self, start: float, regions: np.ndarray) -> None:
        for first, last in np.round((start + regions) * 100).astype(np.int64):
            frames = self.counts[first:last]
            self.speech += int(np.count_nonzero(frames == 0))
            self.overlap += int(np.count_nonzero(frames == 1))
            frames += 1

    def overlap_deficit(self, target: float, speech: float) -> float:
        """Seconds of overlap a new turn with `speech` seconds of speech needs to bring the ratio to `target`.

        From (overlap + x) / (speech so far + speech - x) = target.
        """
        return (target * (self.speech / 100 + speech) - self.overlap / 100) / (1 + target)


def _pick_slice(bank: Bank, speaker_index: int, target: float, cap: float,
                rng: np.random.Generator) -> tuple[int, float, float, np.ndarray]:
    """A random utterance of the speaker, cut from one speech region's start to a later region's end.

    Whole regions are added while the slice stays within `target` (at least one region is taken);
    a slice longer than `cap` is cut there, inside its last region.
    """
    utterances = bank.utterances_of(speaker_index)
    for _ in range(20):
        utterance = int(utterances[rng.integers(utterances.size)])
        regions = bank.regions(utterance, speaker_index)
        if regions.shape[0]:
            break
    else:
        raise NanodrzError(f"speaker {bank.speakers[speaker_index].speaker!r} has no speech regions in the bank")
    first = int(rng.integers(regions.shape[0]))
    start = float(regions[first, 0])
    last = first
    while last + 1 < regions.shape[0] and regions[last + 1, 1] - start <= target:
        last += 1
    end = min(float(regions[last, 1]), start + cap)
    kept = np.array(regions[first:last + 1], dtype=np.float64) - start
    kept = kept[kept[:, 0] < end - start]
    kept[:, 1] = np.minimum(kept[:, 1], end - start)
    return utterance, start, end, kept
