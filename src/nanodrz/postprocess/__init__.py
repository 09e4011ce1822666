"""Post-processing: a recording's stitched chunk turns -> its final turns, one module per rule.

The expensive stage (front ends and decoding, `longform`) leaves `ChunkOutputs`; `ChunkOutputs.finish`
replays the cheap rules under any `PipelineParams`, so `nanodrz tune` can search them without decoding
again. In order:
- `merge`: labels whose voices match are merged;
- `refine`: single-speaker stretches re-labelled by voice, labels holding two voices split;
- `split`: the one label that carries almost all speech split in two, on evidence of a second voice;
- `count`: the speaker counts a user gave, met by merging or splitting labels;
- `absorb`: labels with too little speech join the closest voice;
- `resegment`: turns cut and added by the overlap head's and segmentation-3.0's frame-level counts;
- `stitch`: same-speaker turns joined, artefacts and lone blips of sound dropped, labels renamed in order
  of first turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from nanodrz.annotation import Turn
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.postprocess.absorb import absorb_small_labels
from nanodrz.postprocess.count import fit_speaker_count
from nanodrz.postprocess.merge import merge_by_voice
from nanodrz.postprocess.refine import refine_labels
from nanodrz.postprocess.resegment import FrameCounts, remove_silence, resegment
from nanodrz.postprocess.split import one_voice_heard_as_two, split_dominant_label
from nanodrz.postprocess.stitch import drop_short_islands, drop_shorter_than, rename_by_first_turn, stitch
from nanodrz.postprocess.voices import Voices


@dataclass(frozen=True)
class ChunkOutputs:
    """What a recording's chunks leave behind: stitched turns with the model's confidence in each, the
    recording's voices, the overlap head's and segmentation-3.0's counts (None where the model has no
    such part), the enrolled names, the model's time resolution and the loudest level heard."""

    turns: tuple[Turn, ...]
    scores: tuple[float, ...]
    voices: Voices | None
    counts: FrameCounts | None
    segmentation: FrameCounts | None
    named: frozenset[str]
    time_resolution: float
    loudest_dbfs: float

    def finish(self, params: PipelineParams, settings: DiarizationSettings) -> tuple[list[Turn], list[float]]:
        """The final turns (before `--exclusive`) and their scores, as `nanodrz diarize` gives them."""
        if self.loudest_dbfs < params.resegment.silence_dbfs:  # digital silence: nobody speaks
            return [], []
        turns, scores = list(self.turns), list(self.scores)
        named, counts = self.named, self.counts
        if self.voices is not None:
            voices = self.voices
            turns = merge_by_voice(turns, voices, params.merge, named=named)
            turns, scores = refine_labels(turns, scores, voices, params.refine, params.merge, named=named)
            if one_voice_heard_as_two(turns, voices, counts, params.resegment.overlap_threshold, params.split,
                                      params.refine):
                turns, scores = split_dominant_label(turns, scores, voices, params.refine, named=named)
            turns = absorb_small_labels(turns, voices, params.absorb, named=named)
            turns, scores = fit_speaker_count(turns, scores, voices, params.merge, params.refine,
                                              settings.min_speakers, settings.max_speakers, named)
        if counts is not None:
            turns, scores = resegment(turns, scores, counts.probabilities, counts.frame_rate, params.resegment)
        gate = params.resegment.nonspeech_threshold
        if self.segmentation is not None and gate is not None:
            turns, scores = remove_silence(turns, scores, self.segmentation.probabilities,
                                           self.segmentation.frame_rate, gate, params.resegment.min_gap_seconds)
        turns, scores = stitch(turns, scores, 2 * self.time_resolution)
        turns, scores = drop_shorter_than(turns, scores, 2 * self.time_resolution)
        turns, scores = drop_short_islands(turns, scores, params.resegment.min_island_seconds,
                                           params.resegment.island_gap_seconds)
        return rename_by_first_turn(turns, named), scores
