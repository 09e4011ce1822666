"""Every hyper-parameter of the diarization pipeline, in one frozen nested dataclass.

A model is shipped with the parameters chosen for it on validation speakers (`nanodrz tune`, stored in
the checkpoint's metadata), so a model and its settings travel together. Vary them with
`dataclasses.replace`; `PipelineParams.from_dict` reads them back from JSON or YAML, rejecting unknown
keys. A parameter of the cheap post-processing stage declares the range `nanodrz tune` searches
(`searched`); "or off" ranges also try None. The speaker counts a user asks for are not
hyper-parameters: they are `DiarizationSettings`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nanodrz.config import from_dict
from nanodrz.decoding import DecodingOptions
from nanodrz.errors import ConfigError


@dataclass(frozen=True)
class SearchRange:
    """Where `nanodrz tune` looks for a parameter: [low, high] (whole numbers for an int parameter), and
    None too when `off` is set."""

    low: float
    high: float
    off: bool = False


def searched(default: Any, low: float, high: float, off: bool = False) -> Any:
    """A dataclass field with `default`, searched by `nanodrz tune` over `SearchRange(low, high, off)`."""
    return field(default=default, metadata={"search": SearchRange(low, high, off)})


def search_space(params: "PipelineParams") -> dict[str, tuple[SearchRange, type]]:
    """Dotted name -> (range, int or float) of every searched parameter."""
    space = {}
    for group in dataclasses.fields(params):
        value = getattr(params, group.name)
        for item in dataclasses.fields(value):
            if "search" in item.metadata:
                kind = int if isinstance(getattr(value, item.name), int) else float
                space[f"{group.name}.{item.name}"] = (item.metadata["search"], kind)
    return space


def check_probability(name: str, value: float | None) -> None:
    """A threshold on a probability: in (0, 1], or None for off."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} is a probability in (0, 1] (or off), got {value:g}")


def check_cosine(name: str, value: float | None) -> None:
    """A threshold on a cosine similarity: in [-1, 1], or None for off."""
    if value is not None and not -1.0 <= value <= 1.0:
        raise ConfigError(f"{name} is a cosine similarity in [-1, 1] (or off), got {value:g}")


def check_non_negative(owner: object) -> None:
    """Every field of `owner` whose name ends in `_seconds` is a length of time."""
    for item in dataclasses.fields(owner):
        value = getattr(owner, item.name)
        if item.name.endswith("_seconds") and not (value >= 0.0 and math.isfinite(value)):
            raise ConfigError(f"{type(owner).__name__}.{item.name} must be a finite number of seconds >= 0, "
                               f"got {value}")


@dataclass(frozen=True)
class MergeParams:
    """Labels whose voices match are merged (`postprocess.merge`).

    threshold: merge two labels while their voices' cosine is at least this (centroid linkage); None
        merges only to honour a maximum speaker count.
    min_stretch_seconds: a single-speaker stretch shorter than this tells nothing about a voice.
    """

    threshold: float | None = searched(0.85, 0.6, 0.95)
    min_stretch_seconds: float = searched(0.5, 0.2, 1.5)

    def __post_init__(self):
        check_cosine("merge.threshold", self.threshold)
        check_non_negative(self)


@dataclass(frozen=True)
class RefineParams:
    """Single-speaker stretches re-labelled by voice, labels that hold two voices split
    (`postprocess.refine`).

    passes: rounds of split, re-label and merge (0: keep the labels the model wrote).
    switch_penalty: cosine paid per change of voice on the re-labelling Viterbi path.
    split_threshold: a label splits when its two voice groups are less similar than this ...
    min_split_seconds: ... and each group holds at least this much single-speaker speech.
    block_seconds: single-speaker speech is cut into blocks about this long for the split.
    min_block_seconds: a shorter block has no reliable voice.
    min_blocks: a label with fewer blocks is never split.
    """

    passes: int = searched(3, 0, 4)
    switch_penalty: float = searched(0.25, 0.05, 0.6)
    split_threshold: float = searched(0.7, 0.4, 0.85)
    min_split_seconds: float = searched(1.5, 0.5, 3.0)
    block_seconds: float = 1.5
    min_block_seconds: float = 0.2
    min_blocks: int = 4

    def __post_init__(self):
        if self.passes < 0 or self.min_blocks < 2:
            raise ConfigError(f"refine.passes must be >= 0 and refine.min_blocks >= 2, "
                               f"got {self.passes} and {self.min_blocks}")
        check_cosine("refine.split_threshold", self.split_threshold)
        if not self.switch_penalty >= 0.0 or self.block_seconds <= 0.0:
            raise ConfigError("refine.switch_penalty must be >= 0 and refine.block_seconds > 0")
        check_non_negative(self)


@dataclass(frozen=True)
class SplitParams:
    """One label that carries almost all speech is split in two when something says it holds two voices
    (`postprocess.split`).

    dominant_share: the label carries at least this share of all written speech, and either
    two_voice_cosine: its two voice groups are less similar than this, the smaller holding at least
    two_voice_seconds: this much speech; or the overlap head is sure (at the resegmentation's overlap
        threshold) of at least
    overlap_evidence_seconds: this much overlapped speech, and the two groups are less similar than
    same_voice_cosine: this (the head also hears "overlap" in some monologues).
    A cosine of None turns its evidence off; both None turn the rule off.
    """

    dominant_share: float = searched(0.9, 0.6, 1.0)
    two_voice_cosine: float | None = searched(0.85, 0.6, 0.95, off=True)
    two_voice_seconds: float = searched(3.0, 1.0, 6.0)
    overlap_evidence_seconds: float = searched(0.5, 0.1, 2.0)
    same_voice_cosine: float | None = searched(0.95, 0.85, 1.0, off=True)

    def __post_init__(self):
        if not 0.0 <= self.dominant_share <= 1.0:
            raise ConfigError(f"split.dominant_share is a share in [0, 1], got {self.dominant_share:g}")
        check_cosine("split.two_voice_cosine", self.two_voice_cosine)
        check_cosine("split.same_voice_cosine", self.same_voice_cosine)
        check_non_negative(self)


@dataclass(frozen=True)
class AbsorbParams:
    """A label with less written speech than `min_label_seconds` is an artefact more often than a
    speaker (pyannote's `min_cluster_size` in spirit): it joins the label with the closest voice
    (`postprocess.absorb`)."""

    min_label_seconds: float = searched(1.5, 0.0, 4.0)

    def __post_init__(self):
        check_non_negative(self)


@dataclass(frozen=True)
class ResegmentParams:
    """Turns cut and added by frame-level speaker counts (`postprocess.resegment`).

    speech_threshold: the overlap head's silence probability that cuts written turns, and speech
        probability that adds the nearest speaker where nothing is written (None: off).
    overlap_threshold: its probability of two or more speakers that adds the nearest other speaker where
        one is written (None: off).
    nonspeech_threshold: segmentation-3.0's no-speech probability that cuts written turns; the network runs
        in the model's front end (`campplus_segmentation`) or, for other models, alone (None: off).
    min_gap_seconds, min_speech_seconds, min_overlap_seconds: the shortest stretch each step acts on.
    min_island_seconds, island_gap_seconds: an island of written speech (turns of any speaker less than
        `island_gap_seconds` apart) with less speech than `min_island_seconds` is dropped: on music the
        model leaves isolated blips, most often at chunk edges (0 keeps every island).
    silence_dbfs: a recording whose loudest sample is below this is digital silence: nobody speaks.
    """

    speech_threshold: float | None = searched(0.5, 0.2, 0.9, off=True)
    overlap_threshold: float | None = searched(0.8, 0.5, 0.95, off=True)
    nonspeech_threshold: float | None = searched(0.7, 0.4, 0.95, off=True)
    min_gap_seconds: float = searched(0.1, 0.0, 0.5)
    min_speech_seconds: float = searched(0.1, 0.0, 0.5)
    min_overlap_seconds: float = searched(0.12, 0.0, 0.5)
    min_island_seconds: float = searched(0.6, 0.0, 2.0)
    island_gap_seconds: float = searched(2.0, 0.5, 5.0)
    silence_dbfs: float = -60.0

    def __post_init__(self):
        check_probability("resegment.speech_threshold", self.speech_threshold)
        check_probability("resegment.overlap_threshold", self.overlap_threshold)
        check_probability("resegment.nonspeech_threshold", self.nonspeech_threshold)
        check_non_negative(self)


@dataclass(frozen=True)
class LongFormParams:
    """How a recording longer than the model's input is walked (`longform`).

    voice_block_seconds: for a model without CAM++ windows in its front end, whose speaker embeddings come
        from a voice function given to `Diarizer`: that function embeds blocks this long (CAM++ normalises
        over its whole input). A front end with them embeds each model input once, and the voice track
        reads the chunk's part.
    clip_margin_seconds: a prompt clip keeps this far from the edges of its single-speaker stretch, where
        the boundary estimate is least sure.
    encode_once: run the frozen encoders (CAM++, segmentation-3.0) once per chunk and take the model
        inputs' features, the voice track and the segmentation gate from that pass (`encode_once`):
        faster, with slightly different features.
    """

    voice_block_seconds: float = 60.0
    clip_margin_seconds: float = 0.1
    encode_once: bool = False

    def __post_init__(self):
        check_non_negative(self)
        if self.voice_block_seconds <= 0:
            raise ConfigError("long_form.voice_block_seconds must be positive")


@dataclass(frozen=True)
class PipelineParams:
    """The whole pipeline's hyper-parameters. The defaults are model v1's before `nanodrz tune`; each shipped
    model stores the values chosen for it."""

    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    long_form: LongFormParams = field(default_factory=LongFormParams)
    merge: MergeParams = field(default_factory=MergeParams)
    refine: RefineParams = field(default_factory=RefineParams)
    split: SplitParams = field(default_factory=SplitParams)
    absorb: AbsorbParams = field(default_factory=AbsorbParams)
    resegment: ResegmentParams = field(default_factory=ResegmentParams)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "pipeline") -> "PipelineParams":
        return from_dict(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_values(self, changes: dict[str, Any]) -> "PipelineParams":
        """A copy with dotted keys changed, e.g. {"merge.threshold": 0.8, "resegment.speech_threshold": None}."""
        values = self.to_dict()
        for key, value in changes.items():
            group, _, name = key.partition(".")
            if group not in values or not isinstance(values[group], dict) or name not in values[group]:
                raise ConfigError(f"unknown pipeline parameter {key!r}")
            values[group][name] = value
        return PipelineParams.from_dict(values)


def with_group(params: PipelineParams, group: str, **changes: Any) -> PipelineParams:
    """`params` with fields of one group replaced: `with_group(p, "merge", threshold=0.8)`."""
    return dataclasses.replace(params, **{group: dataclasses.replace(getattr(params, group), **changes)})


@dataclass
class DiarizationSettings:
    """What a user asks of one run (not tuned): speaker counts over the whole recording, and whether at
    most one speaker may talk at a time."""

    num_speakers: int | None = None
    min_speakers: int = 0
    max_speakers: int | None = None
    exclusive: bool = False

    def __post_init__(self):
        if self.num_speakers is not None:
            if self.num_speakers < 1:
                raise ConfigError("--num-speakers must be at least 1")
            self.min_speakers = self.max_speakers = self.num_speakers
        if self.min_speakers < 0 or (self.max_speakers is not None and self.max_speakers < 1):
            raise ConfigError("speaker counts must be positive")
        if self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise ConfigError(f"--min-speakers {self.min_speakers} is more than --max-speakers {self.max_speakers}")
