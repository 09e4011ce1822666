"""Decode a fixed set of short inputs with both shipped models and save, or check, what they write.

A refactor of the model or the decoding loop must not change what the shipped models write: this saves
the tokens, turn scores and speaker-count probabilities of greedy, beam and sampled decoding (with and
without speaker prompts) and, with --check, compares a new run with a saved one (tokens exactly, floats
to --atol).

    OMP_NUM_THREADS=1 python benchmarks/token_step_outputs.py --save /tmp/reference.npz
    OMP_NUM_THREADS=1 python benchmarks/token_step_outputs.py --check /tmp/reference.npz
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch

from nanodrz.annotation import Turn
from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.checkpoint import load_model
from nanodrz.decoding import DecodingOptions, decode

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"v1": ROOT / "src/nanodrz/models/v1.safetensors",
          "v2": ROOT / "src/nanodrz/models/v2_segmentation.safetensors"}
STRATEGIES = {"greedy": DecodingOptions(), "greedy_v2_penalty": DecodingOptions(eos_penalty=2.0),
              "beam": DecodingOptions(strategy="beam", beam_size=3),
              "sample": DecodingOptions(strategy="sample", seed=1)}


def inputs() -> tuple[list[np.ndarray], list[list[Turn]]]:
    """Real speech (the pyannote sample, when set-up fetched it), system sounds, and synthesized tones over
    noise; two of them with a speaker prompt clip at the start."""
    rng = np.random.default_rng(0)
    seconds = np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE
    tones = np.where(seconds < 3, np.sin(2 * np.pi * 180 * seconds), 0.6 * np.sin(2 * np.pi * 310 * seconds))
    audio = [(0.3 * tones + 0.02 * rng.standard_normal(len(seconds))).astype(np.float32),
             (0.05 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32)]
    prompts: list[list[Turn]] = [[], []]
    sounds = sorted(glob.glob("/usr/share/sounds/alsa/*.wav"))
    if sounds:
        audio.append(np.concatenate([load_audio(path) for path in sounds[:6]]).astype(np.float32))
        prompts.append([Turn(0.0, 1.4, "front")])
    sample = ROOT / "data/pyannote-sample/sample.wav"
    if sample.is_file():
        speech = load_audio(sample)
        audio += [speech[:20 * SAMPLE_RATE], speech[8 * SAMPLE_RATE:30 * SAMPLE_RATE]]
        prompts += [[], [Turn(0.0, 2.5, "first")]]
    return audio, prompts


def run() -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    audio, prompts = inputs()
    found: dict[str, np.ndarray] = {}
    for model_name, path in MODELS.items():
        model = load_model(path)
        for strategy, options in STRATEGIES.items():
            batch = slice(None) if strategy.startswith("greedy") else slice(0, 3)
            results = decode(model, audio[batch], prompts[batch], options)
            for i, result in enumerate(results):
                key = f"{model_name}/{strategy}/{i}"
                found[f"{key}/tokens"] = np.array(result.tokens, dtype=np.int64)
                found[f"{key}/scores"] = np.array(result.scores, dtype=np.float64)
                if strategy == "greedy" and result.speaker_counts is not None:
                    found[f"{key}/speaker_counts"] = result.speaker_counts
            print(model_name, strategy, [len(r.tokens) for r in results], flush=True)
    return found


def compare(found: dict[str, np.ndarray], saved: dict[str, np.ndarray], atol: float) -> list[str]:
    problems = [f"{key}: missing" for key in sorted(set(saved) - set(found))]
    problems += [f"{key}: not in the saved run" for key in sorted(set(found) - set(saved))]
    for key in sorted(set(saved) & set(found)):
        new, old = found[key], saved[key]
        if key.endswith("/tokens"):
            if not np.array_equal(new, old):
                problems.append(f"{key}: tokens differ ({old.tolist()} -> {new.tolist()})")
        elif new.shape != old.shape or not np.allclose(new, old, rtol=0, atol=atol):
            worst = np.abs(new - old).max() if new.shape == old.shape else float("nan")
            problems.append(f"{key}: differs (largest difference {worst:.3g})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write this run's outputs here (.npz)")
    action.add_argument("--check", type=Path, help="compare this run's outputs with a saved run (.npz)")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance of scores and speaker counts")
    args = parser.parse_args()
    found = run()
    if args.save:
        np.savez(args.save, **found)
        print(f"saved {len(found)} arrays to {args.save}")
        return 0
    with np.load(args.check) as saved_file:
        saved = dict(saved_file)
    problems = compare(found, saved, args.atol)
    print("\n".join(problems) if problems else f"identical: {len(found)} arrays (floats within {args.atol:g})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
