"""Validation during training: fixed sets of held-out speakers (and recordings), loss and DER.

The sets are made once per run from the config. `validate` scores chunks cut from them
(`validation_examples`), one input at a time: loss, and what the model alone writes. `validate_pipeline`
diarizes the same conversations whole (`pipeline_recordings`) with the shipped long-form pipeline
(`nanodrz.pipeline.Diarizer`) under the run's pipeline parameters: prompts carried across chunks,
stitching and post-processing included, so the checkpoint it picks is the best at what users get.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanodrz.annotation import Turn, to_annotation
from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.decoding import DecodingOptions, decode
from nanodrz.errors import NanodrzError
from nanodrz.evaluate import score
from nanodrz.examples import Example, collate, example_item, fixed_examples
from nanodrz.model import DiarizationModel, sequence_loss, speaker_count_loss, speaker_count_targets
from nanodrz.params import DiarizationSettings, PipelineParams
from nanodrz.pipeline import Diarizer
from nanodrz.recordings import Recording
from nanodrz.recordings import validation_examples as recording_validation_examples
from nanodrz.simulate import check_bank, fixed_conversations
from nanodrz.simulation_config import SimulationConfig, load_preset
from nanodrz.tokenizer import Tokenizer
from nanodrz.training_config import Config


@torch.no_grad()
def validate(model: DiarizationModel, sets: dict[str, list[Example]], batch_size: int, options: DecodingOptions,
             device: torch.device, autocast: Any) -> dict[str, float]:
    """Loss (teacher forcing) and DER of decoding under `options` (collar 0, overlap scored, scored over
    the chunk only), over all validation examples and per preset.

    DER maps hypothesis to reference speakers optimally, so it cannot see a prompted speaker given the
    wrong letter. `val_prompted_ier` scores the letters as written (identification error rate, same
    conditions) on the prompted examples: the error long-form stitching inherits.

    With an overlap head, also its loss and, for the frames it calls overlapped (most likely class),
    precision and recall against the frames that are.
    """
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate
    from pyannote.metrics.identification import IdentificationErrorRate

    model.eval()
    tokenizer = model.tokenizer
    total = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    prompted = IdentificationErrorRate(collar=0.0, skip_overlap=False)
    loss_sum, weight_sum = 0.0, 0.0
    count_loss_sum, count_items, overlap_hits, overlap_called, overlap_true = 0.0, 0, 0, 0, 0
    metrics = {}
    for name, examples in sets.items():
        per_preset = DiarizationErrorRate(collar=0.0, skip_overlap=False)
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = {k: v.to(device) for k, v in collate([example_item(e, tokenizer, 1.0) for e in chunk]).items()}
            with autocast():
                if model.speaker_count is not None:
                    logits, heads, frames = model(batch["audio"], batch["audio_lengths"], batch["tokens"],
                                                  batch["token_lengths"], frame_heads=True)
                    counts = heads["speaker_count"]
                    count_loss_sum += float(speaker_count_loss(counts, frames, batch["spans"],
                                                               model.config.frame_rate)) * len(chunk)
                    count_items += len(chunk)
                    real = torch.arange(counts.shape[1], device=device) < frames[:, None]
                    truth = speaker_count_targets(batch["spans"], counts.shape[1], model.config.frame_rate) == 2
                    called = (counts.argmax(-1) == 2) & real
                    overlap_hits += int((called & truth).sum())
                    overlap_called += int(called.sum())
                    overlap_true += int((truth & real).sum())
                else:
                    logits = model(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
                weights = float(batch["weights"][:, 1:].sum())
                loss_sum += float(sequence_loss(logits, batch["tokens"], batch["weights"])) * weights
                weight_sum += weights
                results = decode(model, [e.audio for e in chunk], [e.prompt for e in chunk], options)
            for index, (example, result) in enumerate(zip(chunk, results)):
                uri = f"{name}{first + index}"
                uem = Timeline([Segment(example.chunk_start, len(example.audio) / SAMPLE_RATE)])
                reference, hypothesis = to_annotation(example.turns, uri), to_annotation(result.turns, uri)
                for metric in (total, per_preset):
                    metric(reference, hypothesis, uem=uem)
                if example.prompt:
                    letters = example.encode(tokenizer).letters
                    lettered = [Turn(t.start, t.end, letters[t.speaker]) for t in example.turns]
                    prompted(to_annotation(lettered, uri), hypothesis, uem=uem)
        metrics[f"val_der_{name}"] = abs(per_preset)
    if count_items:
        metrics["val_speaker_count_loss"] = count_loss_sum / count_items
        metrics["val_overlap_precision"] = overlap_hits / max(overlap_called, 1)
        metrics["val_overlap_recall"] = overlap_hits / max(overlap_true, 1)
    return {"val_loss": loss_sum / max(weight_sum, 1e-8), "val_der": abs(total),
            "val_prompted_ier": abs(prompted), **metrics}


@dataclass(frozen=True)
class WholeRecording:
    """A recording the validation pipeline diarizes whole: its samples (or audio file), reference turns,
    and the stretches that are scored (a simulated conversation's whole length; a recording's UEM)."""

    name: str
    audio: np.ndarray | Path
    turns: tuple[Turn, ...]
    scored: tuple[tuple[float, float], ...]


@torch.no_grad()
def validate_pipeline(model: DiarizationModel, sets: dict[str, list[WholeRecording]], training_config: dict,
                      params: PipelineParams, batch_size: int) -> dict[str, float]:
    """DER of the shipped pipeline (collar 0, overlap scored) per set (`val_pipeline_der_<set>`) and the mean
    over sets (`val_pipeline_der`, what picks the best checkpoint), as fractions like `val_der`.

    The pipeline runs in full precision, as `nanodrz diarize` does; recordings of all sets are batched
    together, `batch_size` at a time.
    """
    diarizer = Diarizer(model, training_config, params)
    keyed = [(f"{name}/{recording.name}", recording) for name, recordings in sets.items() for recording in recordings]
    hypotheses: dict[str, list[Turn]] = {}
    with tqdm(total=len(keyed), desc="validate (pipeline)", unit="recording", leave=False, dynamic_ncols=True) as bar:
        for key, outputs in diarizer.chunk_outputs_many([(key, r.audio) for key, r in keyed], batch_size=batch_size,
                                                        params=params):
            if isinstance(outputs, NanodrzError):
                raise outputs
            hypotheses[key] = outputs.finish(params, DiarizationSettings())[0]
            bar.update(1)
    metrics = {}
    for name, recordings in sets.items():
        keys = [f"{name}/{recording.name}" for recording in recordings]
        report = score({key: list(r.turns) for key, r in zip(keys, recordings)}, {key: hypotheses[key] for key in keys},
                       collars=(0.0,), uem={key: list(r.scored) for key, r in zip(keys, recordings)})
        metrics[f"val_pipeline_der_{name}"] = report.total.at(0.0).der
    return {"val_pipeline_der": float(np.mean(list(metrics.values()))) if metrics else math.nan, **metrics}


def validation_simulations(config: Config, bank: Bank, tokenizer: Tokenizer) -> dict[str, SimulationConfig]:
    """{preset name: simulation config} of the validation presets (default: the last curriculum stage's),
    adapted like the training stream and checked against the bank."""
    validation, stream = config.data.validation, config.data.stream
    simulations = {}
    for name in validation.presets or list(stream.curriculum.stages[-1].presets):
        simulations[name] = stream.adapt(load_preset(name), tokenizer.num_speakers, name)
        check_bank(bank, simulations[name])
    return simulations


def pipeline_recordings(config: Config, bank_root: Path, tokenizer: Tokenizer,
                        held_out: list[Recording] | None = None) -> dict[str, list[WholeRecording]]:
    """{preset name: whole conversations} of the validation set (the ones `validation_examples` cuts its
    chunks from), and `recordings`: the first `conversations` held-out recordings, read from their files
    and scored within their annotated stretches."""
    validation = config.data.validation
    bank = Bank(bank_root, validation.split)
    sets = {}
    for name, simulation in validation_simulations(config, bank, tokenizer).items():
        conversations = fixed_conversations(bank, simulation, validation.conversations, validation.seed)
        sets[name] = [WholeRecording(f"{index:03d}", c.audio, tuple(c.turns), ((0.0, c.duration),))
                      for index, c in enumerate(conversations)]
    if held_out:
        sets["recordings"] = [WholeRecording(r.name, r.audio, r.turns, r.regions)
                              for r in held_out[:validation.conversations]]
    return sets


def validation_examples(config: Config, bank_root: Path, tokenizer: Tokenizer,
                        held_out: list[Recording] | None = None) -> dict[str, list[Example]]:
    """{preset name: examples} of the validation set, and `recordings`: chunks of the held-out recordings."""
    validation = config.data.validation
    bank = Bank(bank_root, validation.split)
    examples = dataclasses.replace(config.data.examples, noise_turns=0.0)
    sets = {}
    for name, simulation in validation_simulations(config, bank, tokenizer).items():
        sets[name] = fixed_examples(bank, simulation, examples, tokenizer.config.max_seconds,
                                    validation.conversations, validation.seed)
    if held_out:
        sets["recordings"] = recording_validation_examples(held_out, examples, tokenizer.config.max_seconds,
                                                           validation.conversations, validation.seed)
    return sets
