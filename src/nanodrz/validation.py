"""Validation during training: fixed examples of held-out speakers (and recordings), loss and DER.

The sets are made once per run from the config (`validation_examples`); `validate` scores the model on
them with the decoding it will be used with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from nanodrz.annotation import Turn, to_annotation
from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.decoding import DecodingOptions, decode
from nanodrz.examples import Example, collate, example_item, fixed_examples
from nanodrz.model import DiarizationModel, sequence_loss, speaker_count_loss, speaker_count_targets
from nanodrz.recordings import Recording
from nanodrz.recordings import validation_examples as recording_validation_examples
from nanodrz.simulate import check_bank
from nanodrz.simulation_config import load_preset
from nanodrz.tokenizer import Tokenizer
from nanodrz.training_config import Config, ValidationConfig


@torch.no_grad()
def validate(model: DiarizationModel, sets: dict[str, list[Example]], batch_size: int, options: DecodingOptions,
             device: torch.device, autocast: Any) -> dict[str, float]:
    """Loss (teacher forcing) and DER of greedy decoding (collar 0, overlap scored, scored over the
    chunk only), over all validation examples and per preset.

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


def validation_options(validation: ValidationConfig) -> DecodingOptions:
    return DecodingOptions(max_triples=validation.max_triples, eos_penalty=validation.eos_penalty)


def validation_examples(config: Config, bank_root: Path, tokenizer: Tokenizer,
                        held_out: list[Recording] | None = None) -> dict[str, list[Example]]:
    """{preset name: examples} of the validation set, and `recordings`: chunks of the held-out recordings."""
    validation, stream = config.data.validation, config.data.stream
    names = validation.presets or list(stream.curriculum.stages[-1].presets)
    bank = Bank(bank_root, validation.split)
    examples = dataclasses.replace(config.data.examples, noise_turns=0.0)
    sets = {}
    for name in names:
        simulation = stream.adapt(load_preset(name), tokenizer.num_speakers, name)
        check_bank(bank, simulation)
        sets[name] = fixed_examples(bank, simulation, examples, tokenizer.config.max_seconds,
                                    validation.conversations, validation.seed)
    if held_out:
        sets["recordings"] = recording_validation_examples(held_out, examples, tokenizer.config.max_seconds,
                                                           validation.conversations, validation.seed)
    return sets
