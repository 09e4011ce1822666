"""Cost of one autoregressive token step of greedy decoding with the shipped model, on one CPU thread.

Decodes 20 s windows of the pyannote sample (set-up fetches it; synthesized tones otherwise) at batch 1
and 8 with `decoding.decode`, timing the prefill and every `model.step` call. A token step is one
iteration of the generation loop: the model step plus choosing the token under the grammar. Reports, per
batch size, the best over repeats (as timeit does: on a shared machine every slower run is a run that
something else slowed down) of

* ms per token step (the generation loop's time, prefill excluded, over its steps) and of that, the
  model's own step, in wall-clock and in CPU time;
* token steps per second (rows x steps over the loop's time) and the prefill's ms;
* the number of ATen operations per token step (those not called by another one, prefill excluded):
  unlike the times, the same on any machine, busy or not.

Results go under --label in --json, next to the labels already there (e.g. "before" and "after" a change,
run one after the other, twice: a shared machine's load changes by the minute; an older tree runs from an
export of its sources):

    mkdir -p /tmp/before && git archive b10f656 src | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/token_step_speed.py --label before \
        --commit b10f656
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/token_step_speed.py --label after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanodrz.audio import SAMPLE_RATE, load_audio
from nanodrz.checkpoint import load_model
from nanodrz.decoding import DecodingOptions, decode

ROOT = Path(__file__).resolve().parents[1]


def windows(count: int, seconds: float = 20.0) -> list[np.ndarray]:
    """`count` windows of `seconds`, spread over the real sample (or over synthesized tones)."""
    sample = ROOT / "data/pyannote-sample/sample.wav"
    if sample.is_file():
        audio = load_audio(sample)
    else:
        t = np.arange(30 * SAMPLE_RATE) / SAMPLE_RATE
        audio = (0.3 * np.sin(2 * np.pi * np.where(t % 6 < 3, 180, 310) * t)).astype(np.float32)
    length = int(seconds * SAMPLE_RATE)
    starts = np.linspace(0, len(audio) - length, count).astype(int) if count > 1 else [0]
    return [audio[start:start + length] for start in starts]


class Timed:
    """Wraps a model's `prefill` and `step` to add up their wall-clock and CPU time and count the steps
    (on a shared machine, CPU time is the steadier figure: waiting for a core does not count)."""

    def __init__(self, model: torch.nn.Module):
        self.reset()
        prefill, step = model.prefill, model.step

        def timed_prefill(*args, **kwargs):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            with torch.profiler.record_function("prefill"):
                out = prefill(*args, **kwargs)
            self.prefill_seconds += time.perf_counter() - begin
            self.prefill_cpu_seconds += time.process_time() - begin_cpu
            return out

        def timed_step(*args, **kwargs):
            begin, begin_cpu = time.perf_counter(), time.process_time()
            out = step(*args, **kwargs)
            self.step_seconds += time.perf_counter() - begin
            self.step_cpu_seconds += time.process_time() - begin_cpu
            self.steps += 1
            return out

        model.prefill, model.step = timed_prefill, timed_step

    def reset(self) -> None:
        self.prefill_seconds = self.prefill_cpu_seconds = self.step_seconds = self.step_cpu_seconds = 0.0
        self.steps = 0


def operations_per_step(model: torch.nn.Module, audio: list[np.ndarray], timer: Timed) -> float:
    """Top-level ATen operations of one greedy decode outside the prefill, per token step."""
    timer.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        decode(model, audio, None, DecodingOptions())
    count = 0
    for event in profile.events():
        parents = []
        parent = event.cpu_parent
        while parent is not None:
            parents.append(parent.name)
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and "prefill" not in parents and not any(
                name.startswith("aten::") for name in parents):
            count += 1
    return count / timer.steps


def measure(model_path: Path, batch: int, repeats: int) -> dict:
    model = load_model(model_path)
    timer = Timed(model)
    audio = windows(batch)
    decode(model, audio, None, DecodingOptions())  # warm-up
    runs = []
    for _ in range(repeats):
        timer.reset()
        begin, begin_cpu = time.perf_counter(), time.process_time()
        results = decode(model, audio, None, DecodingOptions())
        loop = time.perf_counter() - begin - timer.prefill_seconds
        loop_cpu = time.process_time() - begin_cpu - timer.prefill_cpu_seconds
        runs.append({"ms_per_token_step": 1000 * loop / timer.steps,
                     "ms_per_model_step": 1000 * timer.step_seconds / timer.steps,
                     "cpu_ms_per_token_step": 1000 * loop_cpu / timer.steps,
                     "cpu_ms_per_model_step": 1000 * timer.step_cpu_seconds / timer.steps,
                     "token_steps_per_second": batch * timer.steps / loop,
                     "prefill_ms": 1000 * timer.prefill_seconds})
    best = {key: (max if key.endswith("per_second") else min)(run[key] for run in runs) for key in runs[0]}
    written = sum(len(result.tokens) for result in results)
    measured = {"batch": batch, "repeats": repeats, "steps": timer.steps, "tokens_written": written,
                **{key: round(value, 3) for key, value in best.items()}}
    return {**measured, "aten_ops_per_token_step": round(operations_per_step(model, audio, timer), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "src/nanodrz/models/v1.safetensors")
    parser.add_argument("--label", required=True, help="name of this measurement in the results (before, after)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/token_step_speed.json")
    parser.add_argument("--commit", help="the commit of the nanodrz that runs, when PYTHONPATH points at "
                                         "another tree (default: this checkout's HEAD)")
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("token_step_speed: run with OMP_NUM_THREADS=1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = []
    for batch in (1, 8):
        rows.append(measure(args.model, batch, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=ROOT).stdout.strip()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results[args.label] = {"model": args.model.name, "commit": commit, "torch": torch.__version__, "threads": 1,
                           "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
