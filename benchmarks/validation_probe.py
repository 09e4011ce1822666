"""Where a checkpoint's errors are: teacher-forced loss and accuracy per kind of token, and greedy DER.

Runs on the validation set a training config builds (fixed conversations of validation speakers, as
`nanodrz train` validates). For each preset it reports, over the answer tokens the model is trained on,
the mean cross-entropy and argmax accuracy of time tokens, speaker letters and EOS, given the reference
tokens before them; then the per-chunk DER that training's validation reports (`validation.validate`), and
the DER of the long-form pipeline on the same conversations whole (`validation.validate_pipeline`, which
picks training's best checkpoint). A model whose letters are poor under teacher forcing cannot tell voices
apart; one whose letters are good there but whose DER is poor drifts when it reads its own output; one
whose per-chunk DER is good but whose pipeline DER is poor loses its speakers across chunks.

    .venv/bin/python benchmarks/validation_probe.py configs/small_span.yaml MODEL.safetensors [...] \
        [--set data.bank=data/bank --set data.validation.pipeline.decoding.eos_penalty=2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanodrz.checkpoint import load_model
from nanodrz.config import load_config, to_dict
from nanodrz.errors import NanodrzError
from nanodrz.examples import collate, example_item
from nanodrz.features import bf16_is_fast
from nanodrz.paths import default_bank_dir
from nanodrz.training_config import Config
from nanodrz.validation import pipeline_recordings, validate, validate_pipeline, validation_examples

KINDS = ("time", "letter", "eos")


def bf16_autocast():
    """The precision training validates in, where the CPU has native bfloat16."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast(torch.device("cpu")))


def token_kinds(targets: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, N) index into KINDS per target token (-1: none of them)."""
    kinds = torch.full_like(targets, -1)
    kinds[(targets >= tokenizer.time_offset) & (targets < tokenizer.speaker_offset)] = 0
    kinds[targets >= tokenizer.speaker_offset] = 1
    kinds[targets == tokenizer.EOS] = 2
    return kinds


def probe(model, sets, batch_size: int) -> dict[tuple[str, str], tuple[int, float, float]]:
    """{(preset, kind): (tokens, mean cross-entropy, accuracy)} under teacher forcing."""
    tokenizer, results = model.tokenizer, {}
    for name, examples in sets.items():
        sums = torch.zeros(len(KINDS), 3)
        for first in range(0, len(examples), batch_size):
            batch = collate([example_item(e, tokenizer, 1.0) for e in examples[first:first + batch_size]])
            with torch.no_grad(), bf16_autocast():
                logits = model(batch["audio"], batch["audio_lengths"], batch["tokens"], batch["token_lengths"])
            logits, targets = logits[:, :-1].float(), batch["tokens"][:, 1:]
            losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            right = logits.argmax(-1) == targets
            kinds = torch.where(batch["weights"][:, 1:] > 0, token_kinds(targets, tokenizer), -1)
            for index in range(len(KINDS)):
                chosen = kinds == index
                sums[index] += torch.tensor([chosen.sum(), losses[chosen].sum(), right[chosen].sum()], dtype=torch.float)
        for index, kind in enumerate(KINDS):
            count, loss, right = sums[index].tolist()
            results[(name, kind)] = (int(count), loss / max(count, 1), right / max(count, 1))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="training config whose validation set to use")
    parser.add_argument("models", nargs="+", help="checkpoints (.safetensors)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the training config, e.g. "
                             "data.validation.pipeline.decoding.eos_penalty=2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        config = load_config(Config, args.config, args.set)
        for path in args.models:
            model = load_model(path).eval()
            bank = Path(config.data.bank) if config.data.bank else default_bank_dir()
            sets = validation_examples(config, bank, model.tokenizer)
            validation = config.data.validation
            print(f"{path}")
            for (name, kind), (count, loss, accuracy) in probe(model, sets, validation.batch_size).items():
                print(f"  {name:8s} {kind:6s} tokens {count:5d}  loss {loss:.3f}  accuracy {accuracy:.3f}")
            metrics = validate(model, sets, validation.batch_size, validation.pipeline.decoding,
                               torch.device("cpu"), bf16_autocast)
            print("  per chunk " + ", ".join(f"{key} {100 * value:.1f}%" for key, value in metrics.items()
                                             if key.startswith("val_der") or key == "val_prompted_ier"))
            metrics = validate_pipeline(model, pipeline_recordings(config, bank, model.tokenizer), to_dict(config),
                                        validation.pipeline, validation.batch_size)
            print("  pipeline " + ", ".join(f"{key} {100 * value:.1f}%" for key, value in metrics.items()))
    except NanodrzError as error:
        print(f"validation_probe: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
