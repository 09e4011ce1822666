"""CPU seconds of diarizing one 5.6-minute recording (ten validation `crowd` files end to end) with and
without `long_form.encode_once`, one thread, twice each (CPU time, since the machine is shared).

    .venv/bin/python benchmarks/encode_once_speed.py
"""
import time, numpy as np, soundfile as sf, torch
from pathlib import Path
torch.set_num_threads(1)
from nanodrz.pipeline import Diarizer
wavs = sorted(Path("data/validation_sets/crowd").glob("*.wav"))[:10]
audio = np.concatenate([sf.read(str(w), dtype="float32")[0] for w in wavs])
seconds = len(audio) / 16000
d = Diarizer.from_pretrained()
list(d.diarize_many([("warm", audio[:16000 * 10])]))
for once in (False, True, False, True):
    p = d.params.with_values({"long_form.encode_once": once})
    c, w = time.process_time(), time.time()
    list(d.diarize_many([("x", audio)], params=p))
    cpu, wall = time.process_time() - c, time.time() - w
    print(f"encode_once={once}: {seconds:.0f} s audio, CPU {cpu:.1f} s ({seconds / cpu:.1f}x real time per CPU second), wall {wall:.1f} s", flush=True)
