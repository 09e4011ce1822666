"""Diarization speed on CPU, nanodrz next to senko on the same files: warm x-real-time and peak memory by
recording length, cold start of the command line, and where one recording's time goes.

The recordings (default 1, 10 and 60 minutes) are one simulated meeting (the `long` preset at 5 minutes)
looped to each length and written as 16 kHz WAV files to a temporary folder. Its voices come from the test
split of a prepared bank (`--bank`; default data/bank, then ~/.cache/nanodrz/bank, each used only once
`nanodrz prepare` has finished it: its identities.json matches its shards), else of the synthetic test bank.

* Warm speed: each length is diarized by nanodrz (`Diarizer.from_pretrained`, then `diarizer(path)`) and by
  senko (`baseline.SenkoBaseline`, silero VAD + CAM++ + clustering, run offline), each in its own process
  pinned to `--cores` cores with `--threads` torch threads, nanodrz's frozen encoders on `--encoder-threads`
  (default: as many as cores, as `nanodrz diarize`; a revision before that option runs them on `--threads`)
  and senko on the larger of the two (its own thread count is set to it).
  The process loads its system, diarizes a 10 s warm-up clip (senko, for files of 20 minutes and more,
  also compiles its UMAP+HDBSCAN clustering the way its own warm-up does), then the whole file, timed
  (`--repeats` times, the fastest kept): x real time = audio seconds / seconds of that call. Peak RSS is
  the process's VmHWM (its ru_maxrss, less the parent's peak that Linux carries into a child's). CPU
  seconds and the machine's load average are kept too: on a shared machine a process waits for its
  cores, and the ratio of CPU seconds is the steadier comparison.
* Cold start: wall time from process start to exit of `nanodrz diarize FILE.wav > /dev/null` on a 30 s
  file, next to `python -c pass`, `python -c "import torch"` and `python -c "import nanodrz.diarize"`
  (median of `--cold-repeats`, each pinned to `--cores` cores), so the report says what is beyond Python
  and torch import; and `python -X importtime`'s account of `import nanodrz.diarize` by package.
* Profile: one `--profile-minutes` recording (default 10) through nanodrz on one core and one thread, with
  timers around the calls the pipeline makes: `decoding.decode` (passed as the Diarizer's `decode_fn`, with
  a model whose `prefill` and `step` are timed), forward hooks on the frozen encoders (CAM++ trunk and dense
  layer, segmentation-3.0 network), the mel stem, the transformer blocks and the overlap head, the
  Diarizer's `input_encoder` (the frozen encoders over each model input, before the model) /
  `voice_function` / `count_function`, and post-processing (`ChunkOutputs.finish`), in wall and
  CPU seconds. Time is attributed to the innermost timed call. Also FLOPs
  (torch.utils.flop_counter) of each frozen encoder per audio second and of the transformer per chunk and
  per token step, against the GFLOP/s of a 2048x2048 fp32 and bf16 matmul on these cores.

Targets of issue 18 are printed next to each figure: warm 10-minute file at least 100x real time; at least
3x senko's speed at every length; a 2-hour file in under 3 minutes with peak RSS under 1.5 GB (only when
`--lengths` includes 120); cold start under 5 s beyond Python and torch import.

    .venv/bin/python benchmarks/diarize_speed.py [--model PATH] [--lengths 1,10,60] [--cores 2] [--threads N]
        [--repeats 1] [--bank DIR] [--cold-repeats 3] [--profile-minutes 10] [--at REV] [--json OUT.json]
        [--markdown OUT.md]

The "before" measurement of the speed work (the committed code, on one torch thread: on the shared 2-core
machine it was measured on, two threads made both systems slower, nanodrz 3-4x, waiting for a busy core at
every parallel region; one thread is also the `nanodrz diarize` default):

    .venv/bin/python benchmarks/diarize_speed.py --at HEAD --lengths 1,10 --threads 1 \\
        --json benchmarks/results/diarize_speed.json --markdown benchmarks/results/diarize_speed.md
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile as sf

from nanodrz.audio import SAMPLE_RATE
from nanodrz.bank import Bank
from nanodrz.paths import default_bank_dir
from nanodrz.pipeline import SHIPPED_MODEL
from nanodrz.simulate import conversation_rng, simulate_conversation
from nanodrz.simulation_config import load_preset

ROOT = Path(__file__).resolve().parents[1]
MEETING_SECONDS = 300
WARM_UP_SECONDS = 10.0
COLD_START_SECONDS = 30.0
SENKO_UMAP_SECONDS = 1200.0  # senko clusters recordings of 20 minutes and more with UMAP+HDBSCAN (JIT-compiled)
# Issue 18's targets.
TARGET_X_REAL_TIME_10_MIN = 100.0
TARGET_RATIO_TO_SENKO = 3.0
TARGET_TWO_HOURS_SECONDS = 180.0
TARGET_TWO_HOURS_RSS_MB = 1536.0
TARGET_COLD_BEYOND_TORCH_SECONDS = 5.0
RESULT_PREFIX = "RESULT "


# --------------------------------------------------------------------------------------------------
# The audio


def bank_is_ready(root: Path) -> bool:
    """Whether `nanodrz prepare` has finished the bank at `root`: its shards are complete and the
    identities.json it writes last was measured on exactly these shards (the key is its digest of them)."""
    indexes = sorted((root / "shards").glob("*/index.json"))
    if not indexes or not (root / "identities.json").is_file():
        return False
    digest = hashlib.sha256()
    for index in indexes:
        digest.update(index.parent.name.encode() + index.read_bytes())
    try:
        return json.loads((root / "identities.json").read_text()).get("key") == digest.hexdigest()
    except (OSError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def test_voices(bank_dir: Path | None) -> Iterator[tuple[Bank, str]]:
    """The test split of the bank asked for, else of the first finished bank, else of the synthetic test
    bank (built in a temporary folder for as long as it is used), and where its voices come from."""
    if bank_dir is not None:
        yield Bank(bank_dir, "test"), f"bank {bank_dir}"
        return
    for candidate in (ROOT / "data" / "bank", default_bank_dir()):
        if bank_is_ready(candidate):
            yield Bank(candidate, "test"), f"bank {candidate}"
            return
        if (candidate / "shards").is_dir():
            print(f"bank {candidate} is not finished (no identities.json matching its shards); not used", flush=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_bank

    with tempfile.TemporaryDirectory() as temporary:
        yield Bank(build_tiny_bank(Path(temporary) / "bank"), "test"), "synthetic test bank (tests/conftest.py)"


def meeting_audio(bank_dir: Path | None) -> tuple[np.ndarray, str]:
    """A 5 minute simulated meeting and where its voices come from."""
    with test_voices(bank_dir) as (bank, origin):
        speakers = min(5, bank.num_speakers)
        # No rooms: reverberation does not change the cost, and the room bank would be simulated first.
        config = load_preset("long", [f"duration={MEETING_SECONDS}", f"num_speakers=[2,{speakers}]",
                                      "reverb.probability=0"])
        return simulate_conversation(bank, config, conversation_rng(0, 0)).audio, origin


def write_looped(path: Path, meeting: np.ndarray, minutes: float) -> Path:
    """`minutes` of the meeting played over and over, written block by block."""
    remaining = int(round(minutes * 60 * SAMPLE_RATE))
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, "PCM_16") as handle:
        while remaining > 0:
            block = meeting[:remaining]
            handle.write(block)
            remaining -= len(block)
    return path


# --------------------------------------------------------------------------------------------------
# Child processes: each measures one thing, pinned, and prints one RESULT line of JSON


def pin(cores: int, threads: int) -> None:
    """Run on `cores` cores (the first ones this process may use) with `threads` torch threads."""
    import torch

    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, its own address space's high-water mark. (ru_maxrss
    would do on its own, but Linux carries the parent's peak over fork and exec into it.)"""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def warm_up_clip(audio: Path) -> np.ndarray:
    return sf.read(str(audio), frames=int(WARM_UP_SECONDS * SAMPLE_RATE), dtype="float32")[0]


def timed_call(diarize: Callable[[], object], audio: Path, repeats: int) -> tuple[object, dict]:
    """Run `diarize()` `repeats` times; the fastest run's wall and CPU seconds and real-time figures, the
    peak RSS before and after, and the 1-minute load average of the machine around them."""
    rss_before, load_before = peak_rss_mb(), os.getloadavg()[0]
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = diarize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall, cpu = min(zip(walls, cpus))
    seconds = sf.info(str(audio)).duration
    return outcome, {"audio_seconds": seconds, "wall_seconds": wall, "cpu_seconds": cpu, "all_wall_seconds": walls,
                     "x_real_time": seconds / wall, "real_time_factor": wall / seconds,
                     "seconds_per_audio_minute": wall / (seconds / 60), "peak_rss_mb_before": rss_before,
                     "peak_rss_mb": peak_rss_mb(), "load_average": [load_before, os.getloadavg()[0]]}


def measure_nanodrz(model: Path, audio: Path, repeats: int, encoder_threads: int) -> dict:
    from nanodrz.pipeline import Diarizer

    started = time.perf_counter()
    if "encoder_threads" in inspect.signature(Diarizer.from_pretrained).parameters:
        diarizer = Diarizer.from_pretrained(model, encoder_threads=encoder_threads)
    else:  # a revision (`--at`) before the encoders had their own threads
        diarizer = Diarizer.from_pretrained(model)
    load_seconds = time.perf_counter() - started
    diarizer(warm_up_clip(audio))
    annotation, row = timed_call(lambda: diarizer(audio), audio, repeats)
    return {**row, "load_seconds": load_seconds, "chunk_seconds": diarizer.geometry.chunk_seconds,
            "chunks": int(np.ceil(row["audio_seconds"] / diarizer.geometry.chunk_seconds)),
            "speakers": len(annotation.labels()), "turns": len(annotation)}


def measure_senko(audio: Path, threads: int, repeats: int) -> dict:
    from nanodrz.baseline import SenkoBaseline

    started = time.perf_counter()
    senko = SenkoBaseline()
    # senko sets torch to os.cpu_count() threads while it diarizes; give it the same threads as nanodrz.
    senko.diarizer.logical_cores = threads
    load_seconds = time.perf_counter() - started
    senko(warm_up_clip(audio))
    if sf.info(str(audio)).duration >= SENKO_UMAP_SECONDS:
        # What senko's own warm-up does: compile UMAP+HDBSCAN on random embeddings.
        with contextlib.redirect_stdout(sys.stderr):
            senko.diarizer.umap_hdbscan_cluster(np.random.default_rng(0).standard_normal((4250, 192), np.float32))
    turns, row = timed_call(lambda: senko(audio), audio, repeats)
    return {**row, "load_seconds": load_seconds, "speakers": len({turn.speaker for turn in turns}),
            "turns": len(turns)}


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 1.0) -> dict:
    """GFLOP/s of a size x size matmul in fp32 and bf16 on `threads` threads (best of repeated calls; on one
    thread timed in CPU seconds, like `best_seconds`, on more in wall seconds)."""
    import torch

    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best, spent = float("inf"), 0.0
        while spent < seconds:
            begin = clock()
            a @ b
            elapsed = clock() - begin
            best, spent = min(best, elapsed), spent + elapsed
        rates[name] = 2 * size ** 3 / best / 1e9
    return rates


# --------------------------------------------------------------------------------------------------
# The profile


class StageClock:
    """Nested timers: each stage's time minus that of the stages timed inside it (its own time), in wall
    and CPU seconds, keyed by the path of enclosing stages, so the same call (the CAM++ trunk) is told
    apart by who made it."""

    def __init__(self):
        self.stack: list[list] = []
        self.wall: dict[tuple, float] = defaultdict(float)
        self.cpu: dict[tuple, float] = defaultdict(float)
        self.calls: dict[tuple, int] = defaultdict(int)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()

    def enter(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])

    def leave(self) -> None:
        name, wall, cpu, inner_wall, inner_cpu = self.stack.pop()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        path = tuple(entry[0] for entry in self.stack) + (name,)
        self.wall[path] += wall - inner_wall
        self.cpu[path] += cpu - inner_cpu
        self.calls[path] += 1
        if self.stack:
            self.stack[-1][3] += wall
            self.stack[-1][4] += cpu

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def hook(self, name: str, module) -> None:
        """Time every forward call of `module` as stage `name`."""
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.leave())

    def total(self, *names: str, within: str | None = None, kind: str = "wall") -> float:
        """Own time of the stages called `names` (anywhere, or below a stage `within`)."""
        table = self.wall if kind == "wall" else self.cpu
        return sum(value for path, value in table.items()
                   if path[-1] in names and (within is None or within in path[:-1]))

    def count(self, name: str) -> int:
        return sum(value for path, value in self.calls.items() if path[-1] == name)


class TimedModel:
    """The model as `decoding.decode` sees it, with `prefill` and `step` timed (everything else is the
    model's own); optionally also counting the FLOPs of each call."""

    def __init__(self, model, clock: StageClock, flops: dict[str, list[int]] | None = None):
        self._model, self._clock, self._flops = model, clock, flops

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def _call(self, name: str, *args, **kwargs):
        if self._flops is None:
            with self._clock.stage(name):
                return getattr(self._model, name)(*args, **kwargs)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            outcome = getattr(self._model, name)(*args, **kwargs)
        self._flops[name].append(counter.get_total_flops())
        return outcome

    def prefill(self, *args, **kwargs):
        return self._call("prefill", *args, **kwargs)

    def step(self, *args, **kwargs):
        return self._call("step", *args, **kwargs)


def profile_nanodrz(model_path: Path, audio: Path) -> dict:
    """One recording through a Diarizer whose calls are timed (see the module's docstring)."""
    import torch

    from nanodrz.checkpoint import build_model, load_checkpoint
    from nanodrz.decoding import decode
    from nanodrz.params import DiarizationSettings
    from nanodrz.pipeline import Diarizer

    clock = StageClock()
    input_seconds: dict[str, float] = defaultdict(float)  # audio seconds each stage was given

    def timed_decode(model, inputs, prompts, options, frozen=None):
        input_seconds["decode"] += sum(len(samples) for samples in inputs) / SAMPLE_RATE
        with clock.stage("decode"):
            return decode(TimedModel(model, clock), inputs, prompts, options, frozen)

    def timed_function(name: str, function: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def timed(samples: np.ndarray) -> np.ndarray:
            input_seconds[name] += len(samples) / SAMPLE_RATE
            with clock.stage(name):
                return function(samples)
        return timed

    checkpoint = load_checkpoint(model_path)
    model = build_model(checkpoint)
    diarizer = Diarizer(model, checkpoint.config, checkpoint.pipeline, decode_fn=timed_decode)
    diarizer(warm_up_clip(audio))  # loads what loads lazily (the segmenter) before the hooks go on
    input_encoder = getattr(diarizer, "input_encoder", None)  # absent in revisions before it (`--at`)
    if input_encoder is not None:
        encode = input_encoder.encode

        def timed_encode(samples: np.ndarray, chunk_samples: int):
            input_seconds["input_encoder"] += len(samples) / SAMPLE_RATE
            with clock.stage("input_encoder"):
                return encode(samples, chunk_samples)

        input_encoder.encode = timed_encode
    if diarizer.voice_function is not None:
        diarizer.voice_function = timed_function("voice_function", diarizer.voice_function)
    if diarizer.count_function is not None:
        diarizer.count_function = timed_function("count_function", diarizer.count_function)
    for name, modules in model_stages(model).items():
        for module in modules:
            clock.hook(name, module)
    clock.reset()
    input_seconds.clear()

    seconds = sf.info(str(audio)).duration
    wall, cpu = time.perf_counter(), time.process_time()
    with clock.stage("long_form"):
        [(_, outputs)] = list(diarizer.chunk_outputs_many([(audio.stem, audio)], batch_size=1))
    if isinstance(outputs, Exception):
        raise outputs
    with clock.stage("postprocess"):
        turns, _ = outputs.finish(diarizer.params, DiarizationSettings())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = clock.count("step")
    rows = []

    def add(group: str, stage: str, stages: list[tuple[str, str | None]], calls: int, note: str = "") -> None:
        stage_wall = sum(clock.total(name, within=within) for name, within in stages)
        stage_cpu = sum(clock.total(name, within=within, kind="cpu") for name, within in stages)
        if calls or stage_wall:
            rows.append({"group": group, "stage": stage, "wall_seconds": stage_wall, "cpu_seconds": stage_cpu,
                         "share": stage_wall / wall, "calls": calls, "note": note})

    front, prefix, tokens = "front ends", "transformer prefix", "autoregressive token steps"
    add(front, "CAM++ trunk, over each model input (input_encoder)", [("campplus_trunk", "input_encoder")],
        clock.count("input_encoder"), "prompt clips + chunk, once: model, voice track and gate")
    add(front, "CAM++ trunk, in the model's front end (prefill)", [("campplus_trunk", "prefill")],
        clock.count("prefill"), "prompt clips + chunk")
    add(front, "CAM++ trunk, for the voice track (voice_function)", [("campplus_trunk", "voice_function")],
        clock.count("voice_function"), "the chunks again, in blocks")
    add(front, "window embeddings (CAM++ dense layer, and pooling in voice_function)",
        [("window_dense", None), ("voice_function", None)], clock.count("prefill") + clock.count("voice_function"))
    add(front, "rest of input_encoder: fbank, pooling the chunk's windows", [("input_encoder", None)],
        clock.count("input_encoder"))
    add(front, "mel stem (log-mel, convolutions)", [("mel_stem", None)], clock.count("mel_stem"))
    add(front, "segmentation-3.0 network", [("segmentation_network", None)], clock.count("segmentation_network"))
    add(front, "segmentation stitching (count_function less its network)", [("count_function", None)],
        clock.count("count_function"))
    add(front, "rest of prefill: fbank, pooling, projections, token embedding", [("prefill", None)],
        clock.count("prefill"))
    add(prefix, "transformer blocks over audio + prompt tokens", [("transformer", "prefill")],
        clock.count("prefill"))
    add(prefix, "overlap head", [("overlap_head", None)], clock.count("overlap_head"))
    add(tokens, "transformer blocks, one token", [("transformer", "step")], steps,
        f"{1000 * clock.total('transformer', within='step') / max(steps, 1):.2f} ms per step")
    add(tokens, "rest of model.step (embedding, span voices, logits)", [("step", None)], steps,
        f"{1000 * clock.total('step') / max(steps, 1):.2f} ms per step")
    add(tokens, "decoding loop (grammar, token choice, results)", [("decode", None)], clock.count("decode"),
        f"{1000 * clock.total('decode') / max(steps, 1):.2f} ms per step")
    add("long-form and post-processing", "long-form bookkeeping (reading, prompts, absorbing turns)",
        [("long_form", None)], 1)
    add("long-form and post-processing", "post-processing (ChunkOutputs.finish)", [("postprocess", None)], 1)
    model_step = clock.total("transformer", within="step") + clock.total("step")
    model_step_cpu = clock.total("transformer", within="step", kind="cpu") + clock.total("step", kind="cpu")
    return {"audio_seconds": seconds, "wall_seconds": wall, "cpu_seconds": cpu, "x_real_time": seconds / wall,
            "chunks": clock.count("decode"), "token_steps": steps,
            "ms_per_token_step": 1000 * model_step / max(steps, 1),
            "ms_per_token_step_with_loop": 1000 * (model_step + clock.total("decode")) / max(steps, 1),
            "cpu_ms_per_token_step": 1000 * model_step_cpu / max(steps, 1),
            "cpu_ms_per_token_step_with_loop":
                1000 * (model_step_cpu + clock.total("decode", kind="cpu")) / max(steps, 1),
            "turns": len(turns), "stages": rows,
            "input_seconds_per_audio_second": {name: value / seconds for name, value in input_seconds.items()},
            "unattributed_seconds": wall - sum(row["wall_seconds"] for row in rows),
            "flops": encoder_flops(diarizer, audio), "matmul_gflops_1_thread": matmul_gflops(1),
            "threads": torch.get_num_threads()}


def model_stages(model) -> dict[str, list]:
    """The modules whose forward calls are timed, by stage name: the frozen encoders (the segmenter, made
    lazily, only once it exists), the mel stem, the transformer's blocks and the overlap head."""
    front_end = model.front_end
    stages = {"transformer": list(model.blocks),
              "mel_stem": [module for module in (getattr(front_end, "mel", None), *getattr(front_end, "convs", ()))
                           if module is not None]}
    if getattr(model, "speaker_count", None) is not None:
        stages["overlap_head"] = [model.speaker_count]
    encoder = getattr(front_end, "encoder", None)
    if encoder is not None:
        stages["campplus_trunk"] = trunk_modules(encoder)
        stages["window_dense"] = [encoder.xvector.dense.linear, encoder.xvector.dense.nonlinear]
    segmenter = front_end.__dict__.get("segmenter")
    if segmenter is not None:
        stages["segmentation_network"] = [segmenter.network]
    return stages


def trunk_modules(encoder) -> list:
    """CAM++'s frame-level trunk as `SpeakerFrontEnd.encode` runs it: the head, then the x-vector layers
    before statistics pooling."""
    modules = [encoder.head]
    for name, layer in encoder.xvector.named_children():
        if name == "stats":
            break
        modules.append(layer)
    return modules


def best_seconds(function: Callable[[], object], repeats: int = 3) -> float:
    """The least CPU seconds of `repeats` calls after one untimed (on one thread, CPU time is the time it
    computes, without the waits for a core that a shared machine adds to wall time)."""
    function()
    timings = []
    for _ in range(repeats):
        begin = time.process_time()
        function()
        timings.append(time.process_time() - begin)
    return min(timings)


def encoder_flops(diarizer, audio: Path) -> list[dict]:
    """FLOPs of each frozen encoder per second of audio (on a 10 s input), of the transformer's prefix and
    steps on a full-length chunk, and the GFLOP/s each achieves here (its time on the same input)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nanodrz.decoding import decode

    def counted(function: Callable[[], object]) -> int:
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    model, front_end = diarizer.model, diarizer.model.front_end
    ten = torch.from_numpy(warm_up_clip(audio))
    rows = []

    def add(part: str, flops: int, seconds: float, per: str, per_audio_second: float | None) -> None:
        rows.append({"part": part, "gflops": flops / 1e9, "per": per, "seconds": seconds,
                     "gflops_per_audio_second": per_audio_second, "achieved_gflops_per_second": flops / seconds / 1e9})

    if hasattr(front_end, "encode"):
        trunk = lambda: front_end.encode(ten)  # noqa: E731
        flops = counted(trunk)
        add("CAM++ trunk (fbank, head, x-vector layers)", flops, best_seconds(trunk), "10 s input",
            flops / 1e9 / WARM_UP_SECONDS)
    if hasattr(front_end, "window_embeddings"):
        features = front_end.encode(ten)
        windows = lambda: front_end.window_embeddings(features)  # noqa: E731
        flops = counted(windows)
        add("window embeddings (pooling, dense)", flops, best_seconds(windows), "10 s input",
            flops / 1e9 / WARM_UP_SECONDS)
    segmenter = front_end.__dict__.get("segmenter")
    if segmenter is not None:
        batch = ten[None, None, :segmenter.window_samples]

        def network():
            with torch.inference_mode():
                return segmenter.network(batch)
        flops = counted(network)
        # Windows overlap: each audio second is run WINDOW / step times.
        add(f"segmentation-3.0 network (one 10 s window, step {segmenter.settings.step_seconds:g} s)", flops,
            best_seconds(network), "10 s window", flops / 1e9 / segmenter.settings.step_seconds)
    full = sf.read(str(audio), frames=int(diarizer.geometry.max_input_seconds * SAMPLE_RATE), dtype="float32")[0]
    lengths = torch.tensor([len(full)])
    front = lambda: front_end(torch.from_numpy(full)[None], lengths)  # noqa: E731
    front_flops = counted(front)
    counts: dict[str, list[int]] = defaultdict(list)
    decode(TimedModel(model, StageClock(), counts), [full], None, diarizer.params.decoding)
    clock = StageClock()
    decode(TimedModel(model, clock), [full], None, diarizer.params.decoding)
    steps = max(clock.count("step"), 1)
    prefill_seconds = clock.total("prefill", kind="cpu")
    add(f"front end, whole ({diarizer.geometry.max_input_seconds:g} s input)", front_flops, best_seconds(front),
        "input", front_flops / 1e9 / diarizer.geometry.max_input_seconds)
    prefix_flops = sum(counts["prefill"]) - front_flops
    add(f"transformer prefix ({diarizer.geometry.max_input_seconds:g} s input, prefill less front end)",
        prefix_flops, max(prefill_seconds - best_seconds(front), 1e-9), "input", None)
    add("one token step (model.step, mean)", int(np.mean(counts["step"]) if counts["step"] else 0),
        clock.total("step", kind="cpu") / steps, "step", None)
    return rows


# --------------------------------------------------------------------------------------------------
# Cold start


def timed_process(command: list[str], cores: int) -> float:
    """Wall seconds from start to exit of `command` pinned to `cores` cores, stdout discarded."""
    allowed = set(sorted(os.sched_getaffinity(0))[:cores])
    begin = time.perf_counter()
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    wall = time.perf_counter() - begin
    if process.returncode != 0:
        sys.exit(f"diarize_speed: {' '.join(command)} failed:\n{process.stderr.decode(errors='replace').strip()}")
    return wall


def import_breakdown(cores: int, top: int = 10) -> list[dict]:
    """Seconds of `import nanodrz.diarize` by top-level package (`python -X importtime`, each module's own
    time summed per package; the timer itself slows imports a little), largest first."""
    allowed = set(sorted(os.sched_getaffinity(0))[:cores])
    child = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nanodrz.diarize"], capture_output=True,
                           text=True, preexec_fn=lambda: os.sched_setaffinity(0, allowed))
    seconds: dict[str, float] = defaultdict(float)
    for line in child.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[0].strip().isdigit():
            seconds[fields[2].strip().split(".")[0]] += int(fields[0]) / 1e6
    ranked = sorted(seconds.items(), key=lambda item: -item[1])
    return [{"package": name, "seconds": value} for name, value in ranked[:top]]


def cold_start(audio: Path, model: Path, cores: int, repeats: int) -> dict:
    """Median wall seconds of each command, the commands interleaved so drift hits them alike."""
    cli = Path(sys.executable).with_name("nanodrz")
    if not cli.is_file():
        cli = Path(shutil.which("nanodrz") or sys.exit("diarize_speed: no nanodrz command next to this Python"))
    diarize = [str(cli), "diarize", str(audio)] + ([] if model == SHIPPED_MODEL else ["--model", str(model)])
    commands = {"python_start": [sys.executable, "-c", "pass"],
                "import_torch": [sys.executable, "-c", "import torch"],
                "import_nanodrz_diarize": [sys.executable, "-c", "import nanodrz.diarize"],
                "nanodrz_diarize_30s": diarize}
    timings: dict[str, list[float]] = defaultdict(list)
    for repeat in range(repeats):
        for name, command in commands.items():
            timings[name].append(timed_process(command, cores))
        print(f"  cold start {repeat + 1}/{repeats}: "
              + ", ".join(f"{name} {timings[name][-1]:.2f} s" for name in commands), flush=True)
    result = {name: {"seconds": statistics.median(values), "all_seconds": values} for name, values in timings.items()}
    result["import_breakdown"] = import_breakdown(cores)
    result["command"] = " ".join(diarize[:2] + [f"{COLD_START_SECONDS:g}s.wav"] + diarize[3:]) + " > /dev/null"
    result["beyond_torch_import_seconds"] = result["nanodrz_diarize_30s"]["seconds"] - result["import_torch"]["seconds"]
    return result


# --------------------------------------------------------------------------------------------------
# The parent


def run_child(kind: str, audio: Path, args: argparse.Namespace, cores: int, threads: int,
              encoder_threads: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(audio), "--model", str(args.model),
               "--cores", str(cores), "--threads", str(threads), "--encoder-threads", str(encoder_threads),
               "--repeats", str(args.repeats)]
    child = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not lines:
        sys.exit(f"diarize_speed: the {kind} run on {audio.name} failed:\n{child.stderr.strip()[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def child_main(args: argparse.Namespace) -> None:
    kind, audio = args.child
    audio = Path(audio)
    pin(args.cores, args.threads)
    if kind == "nanodrz":
        result = measure_nanodrz(args.model, audio, args.repeats, args.encoder_threads)
    elif kind == "senko":
        result = measure_senko(audio, max(args.threads, args.encoder_threads), args.repeats)
    elif kind == "profile":
        result = profile_nanodrz(args.model, audio)
    elif kind == "matmul":
        result = matmul_gflops(args.threads)
    else:
        sys.exit(f"diarize_speed: unknown child {kind!r}")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.rstrip("\n")


def git_state(exported: str | None) -> dict:
    """What was measured: the checkout's HEAD and its uncommitted changes to src/, or the exported commit."""
    import nanodrz

    package = Path(nanodrz.__file__).resolve().parent
    if exported is not None:
        return {"commit": exported, "exported": True, "uncommitted_source_files": [], "package": str(package)}
    return {"commit": git("rev-parse", "--short", "HEAD"), "exported": False,
            "uncommitted_source_files": git("status", "--porcelain", "--", "src").splitlines(),
            "package": str(package)}


def run_at(revision: str, argv: list[str]) -> None:
    """Run this benchmark again on the nanodrz of `revision`: its src/ exported from git to a temporary folder
    that goes first on PYTHONPATH (children and the `nanodrz` command inherit it), then exit with its status."""
    commit = git("rev-parse", "--short", "--verify", "--quiet", f"{revision}^{{commit}}")
    if not commit:
        sys.exit(f"diarize_speed: --at {revision!r} is not a commit of {ROOT}")
    with tempfile.TemporaryDirectory(prefix=f"nanodrz-{commit}-") as folder:
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(folder) / "src"), os.environ.get("PYTHONPATH")]))}
        print(f"measuring commit {commit} (src/ exported to {folder})", flush=True)
        child = subprocess.run([sys.executable, __file__, *argv, "--exported", commit], env=environment)
    sys.exit(child.returncode)


def targets(rows: list[dict], cold: dict | None) -> list[dict]:
    """Each target of issue 18 that this run measured, with the figure and whether it is met."""
    found = []
    for row in rows:
        found.append({"target": f"{row['minutes']:g} min: at least {TARGET_RATIO_TO_SENKO:g}x senko's speed",
                      "value": f"{row['ratio_to_senko']:.2f}x", "met": row["ratio_to_senko"] >= TARGET_RATIO_TO_SENKO})
        if row["minutes"] == 10:
            x = row["nanodrz"]["x_real_time"]
            found.append({"target": f"10 min warm: at least {TARGET_X_REAL_TIME_10_MIN:g}x real time",
                          "value": f"{x:.1f}x", "met": x >= TARGET_X_REAL_TIME_10_MIN})
        if row["minutes"] == 120:
            wall, rss = row["nanodrz"]["wall_seconds"], row["nanodrz"]["peak_rss_mb"]
            found.append({"target": f"2 hours: under {TARGET_TWO_HOURS_SECONDS:g} s", "value": f"{wall:.0f} s",
                          "met": wall < TARGET_TWO_HOURS_SECONDS})
            found.append({"target": f"2 hours: peak RSS under {TARGET_TWO_HOURS_RSS_MB:g} MB", "value": f"{rss:.0f} MB",
                          "met": rss < TARGET_TWO_HOURS_RSS_MB})
    if cold is not None:
        beyond = cold["beyond_torch_import_seconds"]
        found.append({"target": f"cold start: under {TARGET_COLD_BEYOND_TORCH_SECONDS:g} s beyond Python and torch "
                                "import", "value": f"{beyond:.2f} s", "met": beyond < TARGET_COLD_BEYOND_TORCH_SECONDS})
    return found


def print_row(row: dict) -> None:
    n, s = row["nanodrz"], row["senko"]
    print(f"{row['minutes']:>5g} min: nanodrz {n['wall_seconds']:7.1f} s ({n['x_real_time']:6.1f}x real time, "
          f"{n['peak_rss_mb']:5.0f} MB) | senko {s['wall_seconds']:7.1f} s ({s['x_real_time']:6.1f}x, "
          f"{s['peak_rss_mb']:5.0f} MB) | nanodrz / senko speed {row['ratio_to_senko']:.2f}x "
          f"(by CPU time {row['ratio_to_senko_cpu']:.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="checkpoint (default: the shipped model)")
    parser.add_argument("--lengths", default="1,10,60", help="recording lengths in minutes (default: 1,10,60)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores of each measured process (default: 2)")
    parser.add_argument("--threads", type=int, help="torch threads of the warm runs (default: as many as cores)")
    parser.add_argument("--encoder-threads", type=int, help="torch threads of nanodrz's frozen encoders in the warm "
                        "runs (default: as many as cores, as `nanodrz diarize`); senko gets the larger of this and "
                        "--threads")
    parser.add_argument("--repeats", type=int, default=1, help="warm diarize calls per process, the fastest "
                        "reported (default: 1)")
    parser.add_argument("--bank", type=Path, help="prepared bank whose test voices make the meeting (default: "
                        "data/bank, then ~/.cache/nanodrz/bank, if finished; else the synthetic test bank)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="runs of each cold-start command (default: 3; "
                        "0 skips the cold start)")
    parser.add_argument("--profile-minutes", type=float, default=10.0,
                        help="length of the profiled recording (default: 10; 0 skips the profile)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--at", metavar="REV", help="measure the nanodrz of this git revision (its src/ exported "
                        "from git), not the working tree, where others' uncommitted work may be half done")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "AUDIO"), help=argparse.SUPPRESS)
    parser.add_argument("--exported", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.at is not None and args.exported is None:
        run_at(args.at, sys.argv[1:])
    args.threads = args.threads or args.cores
    args.encoder_threads = args.encoder_threads or args.cores
    if not args.model.is_file():
        sys.exit(f"diarize_speed: no model at {args.model}; pass --model PATH to a trained checkpoint")
    if args.child is not None:
        child_main(args)
        return
    try:
        lengths = [float(value) for value in args.lengths.split(",") if value.strip()]
    except ValueError:
        sys.exit(f"diarize_speed: --lengths {args.lengths!r} must be comma-separated minutes")
    if not lengths or min(lengths) <= 0:
        sys.exit("diarize_speed: --lengths needs positive minutes")
    if (args.cores < 1 or args.cores > len(os.sched_getaffinity(0)) or min(args.threads, args.encoder_threads) < 1
            or args.repeats < 1):
        sys.exit(f"diarize_speed: --cores must be 1 to {len(os.sched_getaffinity(0))}, --threads, --encoder-threads "
                 "and --repeats at least 1")

    meeting, origin = meeting_audio(args.bank)
    state = git_state(args.exported)
    print(f"voices: {origin}; model: {args.model}; commit {state['commit']}"
          f"{' with uncommitted changes in src/' if state['uncommitted_source_files'] else ''}; "
          f"{args.cores} core(s), {args.threads} torch thread(s), encoders on {args.encoder_threads}", flush=True)
    rows, cold, profile = [], None, None
    with tempfile.TemporaryDirectory() as folder:
        for minutes in lengths:
            path = write_looped(Path(folder) / f"{minutes:g}min.wav", meeting, minutes)
            row = {"minutes": minutes}
            for kind in ("nanodrz", "senko"):
                print(f"{minutes:g} min: {kind} ...", flush=True)
                row[kind] = run_child(kind, path, args, args.cores, args.threads, args.encoder_threads)
            row["ratio_to_senko"] = row["senko"]["wall_seconds"] / row["nanodrz"]["wall_seconds"]
            row["ratio_to_senko_cpu"] = row["senko"]["cpu_seconds"] / row["nanodrz"]["cpu_seconds"]
            rows.append(row)
            path.unlink()
            print_row(row)
        if args.cold_repeats > 0:
            print(f"cold start on a {COLD_START_SECONDS:g} s file, {args.cold_repeats} runs each ...", flush=True)
            path = write_looped(Path(folder) / f"{COLD_START_SECONDS:g}s.wav", meeting, COLD_START_SECONDS / 60)
            cold = cold_start(path, args.model, args.cores, args.cold_repeats)
            print("  import nanodrz.diarize by package: " + ", ".join(
                f"{item['package']} {item['seconds']:.2f} s" for item in cold["import_breakdown"]), flush=True)
        if args.profile_minutes > 0:
            print(f"profile of {args.profile_minutes:g} min on one thread ...", flush=True)
            path = write_looped(Path(folder) / f"profile{args.profile_minutes:g}min.wav", meeting, args.profile_minutes)
            profile = run_child("profile", path, args, 1, 1, 1)
            profile["matmul_gflops_cores"] = run_child("matmul", path, args, args.cores, args.cores, args.cores)
            print_profile(profile)
    report = {"git": state, "model": str(args.model), "cores": args.cores, "threads": args.threads,
              "encoder_threads": args.encoder_threads, "voices": origin,
              "meeting_seconds": MEETING_SECONDS, "torch": torch_version(), "cpu": cpu_name(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "cold_start": cold, "profile": profile,
              "targets": targets(rows, cold)}
    for target in report["targets"]:
        print(f"target {target['target']}: {target['value']} ({'met' if target['met'] else 'NOT met'})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        shown = sys.argv[1:]
        if args.exported is not None:  # the hidden argument run_at added
            shown = shown[:shown.index("--exported")] + shown[shown.index("--exported") + 2:]
        args.markdown.write_text(markdown(report, shown))
        print(f"wrote {args.markdown}")


def torch_version() -> str:
    import torch

    return torch.__version__


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def input_sentence(profile: dict) -> str:
    """How many seconds of audio each stage reads per second of the recording."""
    names = {"decode": "the model's inputs (prompt clips + chunk, through the front end)",
             "input_encoder": "the model's inputs through the frozen encoders, before the model",
             "voice_function": "the voice track (CAM++ again)", "count_function": "the segmentation counts"}
    parts = [f"{names.get(name, name)} {value:.2f} s"
             for name, value in profile["input_seconds_per_audio_second"].items()]
    return "Audio read per second of recording: " + ", ".join(parts) + "." if parts else ""


def print_profile(profile: dict) -> None:
    print(f"profile: {profile['audio_seconds'] / 60:g} min in {profile['wall_seconds']:.1f} s "
          f"({profile['x_real_time']:.1f}x real time, 1 thread), {profile['token_steps']} token steps")
    for row in profile["stages"]:
        print(f"  {row['share']:6.1%} {row['wall_seconds']:7.2f} s (CPU {row['cpu_seconds']:6.2f} s)  {row['stage']} "
              f"({row['calls']} calls) {row['note']}")
    print("  " + input_sentence(profile))
    for row in profile["flops"]:
        print(f"  {row['part']}: {row['gflops']:.3f} GFLOP per {row['per']}, "
              f"{row['achieved_gflops_per_second']:.1f} GFLOP/s")
    print("  matmul 2048: " + ", ".join(f"{name} {rate:.0f} GFLOP/s (1 thread)"
                                        for name, rate in profile["matmul_gflops_1_thread"].items()), flush=True)


# --------------------------------------------------------------------------------------------------
# The markdown report


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(report: dict, argv: list[str]) -> str:
    state = report["git"]
    if state["exported"]:
        source = (f"commit `{state['commit']}` (its src/ exported from git: uncommitted work in the checkout not "
                  "included)")
    elif state["uncommitted_source_files"]:
        source = f"commit `{state['commit']}` with uncommitted changes in " + ", ".join(
            f"`{line[3:]}`" for line in state["uncommitted_source_files"])
    else:
        source = f"commit `{state['commit']}` (no uncommitted changes in src/)"
    lines = ["# Diarization speed: nanodrz and senko on CPU", "",
             "Written by `benchmarks/diarize_speed.py` (its docstring says how each figure is measured):", "",
             f"    .venv/bin/python benchmarks/diarize_speed.py {' '.join(argv)}", "",
             f"Measured {report['date']} on {source}; model `{Path(report['model']).name}`; {report['cpu']}, torch "
             f"{report['torch']}; each warm run in its own process on {report['cores']} core(s) with "
             f"{report['threads']} torch thread(s), nanodrz's frozen encoders on "
             f"{report.get('encoder_threads', report['threads'])} and senko on "
             f"{max(report['threads'], report.get('encoder_threads', report['threads']))}. Audio: a {report['meeting_seconds'] // 60} minute simulated "
             f"meeting (voices: {report['voices']}) looped to each length. The machine is shared with other "
             "work, so absolute times are noisy; senko runs on the same files in the same session for a ratio.", ""]
    lines += ["## Targets (issue 18)", ""]
    lines += table(["target", "measured", "met"],
                   [[t["target"], t["value"], "yes" if t["met"] else "**no**"] for t in report["targets"]])
    lines += ["", "## Warm speed by length", "",
              "Model already loaded and warmed up; the time of the diarize call alone. x real time = audio seconds / "
              "seconds. Ratio = nanodrz's speed / senko's speed (target at least "
              f"{TARGET_RATIO_TO_SENKO:g}x).", ""]
    for row in report["rows"]:
        minutes = row["minutes"]
        lines += [f"### {minutes:g} minute{'s' if minutes != 1 else ''}", ""]
        cells = []
        for kind in ("nanodrz", "senko"):
            r = row[kind]
            target = ""
            if kind == "nanodrz" and minutes == 10:
                target = f"target >= {TARGET_X_REAL_TIME_10_MIN:g}x"
            if kind == "nanodrz" and minutes == 120:
                target = f"target < {TARGET_TWO_HOURS_SECONDS:g} s and < {TARGET_TWO_HOURS_RSS_MB:g} MB"
            cells.append([kind, f"{r['wall_seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['x_real_time']:.1f}x",
                          f"{r['peak_rss_mb']:.0f}", f"{r['load_seconds']:.1f}", str(r["speakers"]), str(r["turns"]),
                          " / ".join(f"{load:.1f}" for load in r["load_average"]), target])
        lines += table(["system", "seconds", "CPU s", "x real time", "peak RSS MB", "load s", "speakers", "turns",
                        "load average before / after", "target"], cells)
        met = "met" if row["ratio_to_senko"] >= TARGET_RATIO_TO_SENKO else "not met"
        lines += ["", f"Ratio nanodrz / senko speed: **{row['ratio_to_senko']:.2f}x** (target >= "
                      f"{TARGET_RATIO_TO_SENKO:g}x: {met}); by CPU seconds instead of wall seconds "
                      f"{row['ratio_to_senko_cpu']:.2f}x.", ""]
    cold = report["cold_start"]
    if cold is not None:
        torch_import = cold["import_torch"]["seconds"]
        names = {"python_start": "`python -c pass`", "import_torch": "`python -c \"import torch\"`",
                 "import_nanodrz_diarize": "`python -c \"import nanodrz.diarize\"`",
                 "nanodrz_diarize_30s": f"`{cold['command']}`"}
        lines += ["## Cold start", "",
                  f"Process start to exit, median of {len(cold['python_start']['all_seconds'])} runs, each pinned to "
                  f"{report['cores']} core(s); the command line uses its own defaults (one torch thread).", ""]
        lines += table(["command", "seconds", "beyond torch import s", "runs s"],
                       [[names[name], f"{cold[name]['seconds']:.2f}",
                         f"{cold[name]['seconds'] - torch_import:.2f}" if name != "python_start" else "",
                         ", ".join(f"{s:.2f}" for s in cold[name]["all_seconds"])] for name in names])
        beyond = cold["beyond_torch_import_seconds"]
        met = "met" if beyond < TARGET_COLD_BEYOND_TORCH_SECONDS else "not met"
        imported = cold["import_nanodrz_diarize"]["seconds"]
        lines += ["", f"Beyond Python and torch import: **{beyond:.2f} s** (target < "
                      f"{TARGET_COLD_BEYOND_TORCH_SECONDS:g} s: {met}); of it, importing nanodrz.diarize beyond torch "
                      f"{imported - torch_import:.2f} s, the rest (model load, diarizing {COLD_START_SECONDS:g} s, "
                      f"writing RTTM) {cold['nanodrz_diarize_30s']['seconds'] - imported:.2f} s.", "",
                  "`import nanodrz.diarize` by top-level package (`python -X importtime`, own time of each module "
                  "summed per package): " + ", ".join(f"{item['package']} {item['seconds']:.2f} s"
                                                      for item in cold["import_breakdown"]) + ".", ""]
    profile = report["profile"]
    if profile is not None:
        lines += ["## Where the time goes (one recording, one thread)", "",
                  f"{profile['audio_seconds'] / 60:g} minutes through nanodrz on one core and one torch thread: "
                  f"{profile['wall_seconds']:.1f} s ({profile['x_real_time']:.1f}x real time), "
                  f"{profile['chunks']} chunks, {profile['token_steps']} token steps at "
                  f"{profile['ms_per_token_step']:.2f} ms each ({profile['ms_per_token_step_with_loop']:.2f} ms with "
                  f"the decoding loop around it; by CPU time {profile['cpu_ms_per_token_step']:.2f} and "
                  f"{profile['cpu_ms_per_token_step_with_loop']:.2f} ms). CPU {profile['cpu_seconds']:.1f} s: where "
                  "the CPU share is far below the wall share the process waited for the core. Each stage's own time "
                  "(a stage timed inside another counts only in the inner one).", ""]
        groups: dict[str, list[float]] = {}
        for row in profile["stages"]:
            totals = groups.setdefault(row["group"], [0.0, 0.0])
            totals[0] += row["wall_seconds"]
            totals[1] += row["cpu_seconds"]
        wall, cpu = profile["wall_seconds"], profile["cpu_seconds"]
        lines += table(["group", "share of wall", "share of CPU", "wall s", "CPU s"],
                       [[group, f"{w / wall:.1%}", f"{c / cpu:.1%}", f"{w:.2f}", f"{c:.2f}"]
                        for group, (w, c) in groups.items()])
        lines += [""]
        lines += table(["group", "stage", "share of wall", "share of CPU", "wall s", "CPU s", "calls", "note"],
                       [[row["group"], row["stage"], f"{row['share']:.1%}", f"{row['cpu_seconds'] / cpu:.1%}",
                         f"{row['wall_seconds']:.2f}", f"{row['cpu_seconds']:.2f}", str(row["calls"]), row["note"]]
                        for row in profile["stages"]])
        lines += ["", f"Unattributed: {profile['unattributed_seconds']:.3f} s. {input_sentence(profile)}", "",
                  "### FLOPs against what these cores deliver", "",
                  "FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions); time: CPU "
                  "seconds of the same call on one thread (best of 3; token step and prefix: one decode of the input), "
                  "so waiting for the shared core does not count.", ""]
        lines += table(["part", "GFLOP", "per", "GFLOP per audio second", "time", "achieved GFLOP/s"],
                       [[row["part"], f"{row['gflops']:.4f}", row["per"],
                         f"{row['gflops_per_audio_second']:.3f}" if row["gflops_per_audio_second"] is not None else "",
                         f"{row['seconds'] * 1000:.2f} ms", f"{row['achieved_gflops_per_second']:.2f}"]
                        for row in profile["flops"]])
        one, many = profile["matmul_gflops_1_thread"], profile["matmul_gflops_cores"]
        lines += ["", f"A 2048x2048 matmul: fp32 {one['fp32']:.0f} GFLOP/s and bf16 {one['bf16']:.0f} GFLOP/s on one "
                      f"thread; fp32 {many['fp32']:.0f} and bf16 {many['bf16']:.0f} GFLOP/s on {report['cores']} "
                      f"threads on {report['cores']} cores (timed in wall seconds: on a busy machine less than free "
                      "cores give).", "", "### What bounds the speed", "", *bounds(profile), ""]
    return "\n".join(lines) + "\n"


def bounds(profile: dict) -> list[str]:
    """The profile's figures put side by side: what the frozen encoder and the token steps cost per second of
    recording, and how close to what a matmul delivers here each runs."""
    flops = {row["part"].split(" (")[0]: row for row in profile["flops"]}
    matmul = profile["matmul_gflops_1_thread"]
    read = profile["input_seconds_per_audio_second"]
    lines = []
    trunk = flops.get("CAM++ trunk")
    if trunk is not None:
        inputs = read.get("input_encoder", read.get("decode", 0.0))  # the trunk's pass over the model inputs
        audio = inputs + read.get("voice_function", 0.0)
        per_second = trunk["gflops_per_audio_second"] * audio
        lines.append(
            f"* CAM++ trunk: {trunk['gflops_per_audio_second']:.2f} GFLOP per second of audio it reads, and it reads "
            f"{audio:.2f} s per second of recording (model inputs with their prompt clips "
            f"{inputs:.2f} s, the voice track {read.get('voice_function', 0.0):.2f} s): "
            f"{per_second:.2f} GFLOP per second of recording. At the {trunk['achieved_gflops_per_second']:.0f} GFLOP/s "
            f"it achieves on one thread, {1000 * per_second / trunk['achieved_gflops_per_second']:.0f} ms per second "
            f"of recording, a ceiling of {trunk['achieved_gflops_per_second'] / per_second:.0f}x real time from the "
            f"trunk alone; at the bf16 matmul's {matmul['bf16']:.0f} GFLOP/s, "
            f"{matmul['bf16'] / per_second:.0f}x; reading each second once, "
            f"{trunk['achieved_gflops_per_second'] / trunk['gflops_per_audio_second']:.0f}x at the achieved rate.")
    step = flops.get("one token step")
    if step is not None and profile["audio_seconds"]:
        steps = profile["token_steps"] / profile["audio_seconds"]
        rate, per_step = step["achieved_gflops_per_second"], profile["cpu_ms_per_token_step_with_loop"]
        lines.append(
            f"* Token steps: {steps:.1f} per second of recording, {1000 * step['gflops']:.1f} MFLOP each, at "
            f"{rate:.1f} GFLOP/s ({rate / matmul['fp32']:.0%} of the fp32 matmul's {matmul['fp32']:.0f}): bound by "
            "per-operation overhead (Python, dispatch, small kernels), not arithmetic. At "
            f"{per_step:.2f} CPU ms per step with its loop, {steps * per_step:.0f} ms per second of recording, a "
            f"ceiling of {1000 / (steps * per_step):.0f}x real time from the steps alone.")
    return lines


if __name__ == "__main__":
    main()
