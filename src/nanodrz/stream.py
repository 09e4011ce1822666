"""The one endless stream of samples for training and for anyone who wants conversations mixed on the fly.

Sample i of a run is made from its own generator, `np.random.default_rng([seed, i])`: the curriculum
picks the sample's preset, the simulator mixes a conversation, and the stream's `transform` (a training
example, for `nanodrz train`) goes on drawing from the same generator. With annotated recordings, the
samples they claim (a draw of their own per index, `nanodrz.recordings`) are cut from them instead, and
the simulated ones stay those of a stream without recordings.

Batch b of rank r holds the samples (b * world_size + r) * batch_size + j. DataLoader workers take whole
batches round-robin (worker w makes batches start + w, start + w + W, ...), the order in which the
DataLoader hands them out, so the sequence is the same for any number of workers, no two ranks or workers
ever make the same sample, and starting at batch `start_batch` (a resumed run) continues it exactly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from nanodrz.bank import SPLITS, Bank
from nanodrz.config import check_weights
from nanodrz.errors import ConfigError
from nanodrz.simulate import Conversation, check_bank, simulate_conversation
from nanodrz.simulation_config import SimulationConfig, as_range, load_preset

if TYPE_CHECKING:
    from nanodrz.recordings import RecordingSource


@dataclass
class CurriculumStage:
    """From global sample `start` on, draw each conversation's preset with these weights."""

    start: int = 0
    presets: dict[str, float] = field(default_factory=lambda: {"clean": 1.0})
    overrides: list[str] = field(default_factory=list)  # key=value applied to every preset of the stage

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ConfigError(f"curriculum stage start = {self.start}: must be non-negative")
        check_weights("curriculum stage presets", self.presets, tuple(self.presets))


@dataclass
class Curriculum:
    """A schedule of preset mixtures over training, by global sample index."""

    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])

    def __post_init__(self) -> None:
        starts = [stage.start for stage in self.stages]
        if not starts or starts[0] != 0:
            raise ConfigError("curriculum: the first stage must start at sample 0")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ConfigError(f"curriculum: stage starts {starts} must increase")


@dataclass
class StreamConfig:
    """Which conversations the training stream simulates.

    `curriculum` moves through simulator presets by global sample index; num_speakers /
    conversation_seconds, when set, replace every preset's own values, so a curriculum can raise
    difficulty at a fixed speaker count, with conversations long enough to leave material for prompt
    clips outside the chunk.
    """

    curriculum: Curriculum = field(default_factory=Curriculum)
    num_speakers: tuple[int, int] | None = None
    conversation_seconds: tuple[float, float] | None = (20.0, 40.0)

    def adapt(self, config: SimulationConfig, max_speakers: int, name: str) -> SimulationConfig:
        """A preset with the stream's speaker count and length, checked against the tokenizer's letters."""
        if self.num_speakers is not None:
            config = dataclasses.replace(config, num_speakers=tuple(self.num_speakers))
        if self.conversation_seconds is not None:
            config = dataclasses.replace(config, duration=tuple(self.conversation_seconds))
        most = as_range(config.num_speakers)[1]
        if most > max_speakers:
            raise ConfigError(f"preset {name!r} has up to {most} speakers but the tokenizer has {max_speakers}; "
                              "set data.stream.num_speakers or tokenizer.num_speakers")
        return config

    def schedule(self, max_speakers: int) -> Schedule:
        """The curriculum with its presets loaded and adapted."""
        return Schedule.of(self.curriculum, lambda config, name: self.adapt(config, max_speakers, name))


Choices = tuple[tuple[str, SimulationConfig, float], ...]


@dataclass(frozen=True)
class Schedule:
    """A curriculum with its presets loaded: (start, ((name, config, weight), ...)) per stage."""

    stages: tuple[tuple[int, Choices], ...]

    @classmethod
    def of(cls, curriculum: Curriculum,
           adapt: Callable[[SimulationConfig, str], SimulationConfig] = lambda config, name: config) -> Schedule:
        return cls(tuple(
            (stage.start, tuple((name, adapt(load_preset(name, stage.overrides), name), weight)
                                for name, weight in stage.presets.items()))
            for stage in curriculum.stages
        ))

    @classmethod
    def fixed(cls, config: SimulationConfig, name: str = "config") -> Schedule:
        return cls(((0, ((name, config, 1.0),)),))

    def configs(self) -> list[SimulationConfig]:
        return [config for _, choices in self.stages for _, config, _ in choices]

    def choose(self, index: int, rng: np.random.Generator) -> tuple[str, SimulationConfig]:
        """The preset of sample `index`: one of its stage's, drawn by weight."""
        choices = [choices for start, choices in self.stages if start <= index][-1]
        weights = np.asarray([weight for _, _, weight in choices], dtype=np.float64)
        name, config, _ = choices[int(rng.choice(len(choices), p=weights / weights.sum()))]
        return name, config


class ConversationStream(IterableDataset):
    """Endless samples mixed on the fly (see the module's docstring for the order), for DataLoader workers
    and torchrun ranks. Use with `DataLoader(stream, batch_size=None)`.

    conversations: a config, a curriculum, or a schedule already loaded (`StreamConfig.schedule`).
    transform(conversation, rng), picklable, turns each sample into what the stream yields, in the worker;
    batch_size None yields samples one by one (batches of one, unwrapped), else lists of them or what
    `collate` makes of the list. rank and world_size default to torch.distributed's, else torchrun's
    environment. Conversations carry their global `index` and their `preset` in `meta`.
    """

    def __init__(self, bank_root: str | Path, split: str = "train",
                 conversations: SimulationConfig | Curriculum | Schedule | None = None, seed: int = 0, *,
                 batch_size: int | None = None, start_batch: int = 0, rank: int | None = None,
                 world_size: int | None = None, recordings: RecordingSource | None = None,
                 transform: Callable[[Conversation, np.random.Generator], Any] | None = None,
                 collate: Callable[[list[Any]], Any] | None = None, return_sources: bool = False):
        super().__init__()
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if isinstance(conversations, Curriculum):
            conversations = Schedule.of(conversations)
        elif not isinstance(conversations, Schedule):
            conversations = Schedule.fixed(conversations or SimulationConfig())
        self.schedule = conversations
        self.bank_root, self.split, self.seed = Path(bank_root), split, seed
        self.batch_size, self.start_batch = batch_size, start_batch
        self.rank, self.world_size = rank, world_size
        self.recordings, self.transform, self.collate = recordings, transform, collate
        self.return_sources = return_sources

    def _rank_and_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def sample(self, bank: Bank, index: int) -> Any:
        """Sample `index` of the stream: a recording's or a simulated conversation, through the transform."""
        claimed = None if self.recordings is None else self.recordings.draw(self.seed, index)
        if claimed is not None:
            conversation, rng = claimed
            conversation = dataclasses.replace(conversation, meta={**conversation.meta, "index": index})
        else:
            rng = np.random.default_rng([self.seed, index])
            name, config = self.schedule.choose(index, rng)
            conversation = simulate_conversation(bank, config, rng, self.return_sources)
            conversation.meta.update(index=index, preset=name)
        return conversation if self.transform is None else self.transform(conversation, rng)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_and_world()
        bank = Bank(self.bank_root, self.split)  # in the worker: memory maps do not survive pickling
        for config in self.schedule.configs():
            check_bank(bank, config)
        size = self.batch_size or 1
        batch = self.start_batch + worker
        while True:
            first = (batch * world + rank) * size
            items = [self.sample(bank, index) for index in range(first, first + size)]
            if self.batch_size is None:
                yield items[0]
            else:
                yield self.collate(items) if self.collate is not None else items
            batch += workers
