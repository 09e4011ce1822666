"""The frozen encoders once per recording (`long_form.encode_once`): each chunk is encoded once, with a
little audio of its neighbours on each side, and everything else is a slice of that.

Without it (`InputEncoder`), CAM++ and segmentation-3.0 run once over each model input, about 1.5 times
over every second of a recording, as the prompt clips were heard before; the voice track and the
segmentation gate read the chunk's part of that pass. With it, they run once per chunk; the model input's
frozen features are the prompt clips' slices, a gap encoded once, and the chunk's own. The features
differ a little from those of the assembled input (CAM++ normalises its filterbanks over its whole input,
and a window near a clip's edge now sees the clip's own neighbourhood), so the answers can differ:
`nanodrz tune`'s sets measure it.

Slices must fall on the model's frame grid (40 ms at 25 frames/s, two CAM++ frames), so clips start and
end on it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from nanodrz.audio import SAMPLE_RATE
from nanodrz.prompts import PROMPT_GAP_SECONDS
from nanodrz.features import FrozenFeatures


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk's frozen features, and the window embeddings of the chunk with its context, the first at
    `-context_seconds` of the chunk."""

    features: FrozenFeatures
    voices: np.ndarray
    context_seconds: float


class StretchEncoder:
    """The model front end's frozen encoders, run over stretches of a recording."""

    def __init__(self, front_end: torch.nn.Module, context_seconds: float):
        self.front_end = front_end
        self.device = next(front_end.parameters()).device
        self.frame_samples = int(round(SAMPLE_RATE / front_end.frame_rate))
        self.trunk_samples = int(round(SAMPLE_RATE / front_end.encoder_rate))
        self.context = -(-int(context_seconds * SAMPLE_RATE) // self.frame_samples) * self.frame_samples
        self.segments = hasattr(front_end, "segment")
        self.gap = self.encode_alone(np.zeros(int(round(PROMPT_GAP_SECONDS * SAMPLE_RATE)), dtype=np.float32))

    def on_grid(self, samples: int, up: bool = False) -> int:
        """`samples` rounded down (or up) to the model's frame grid."""
        frames = -(-samples // self.frame_samples) if up else samples // self.frame_samples
        return frames * self.frame_samples

    def encode_alone(self, audio: np.ndarray) -> FrozenFeatures:
        """The features of a stretch heard on its own (an enrollment clip, the prompt gap)."""
        return self.encode_chunk(np.zeros(0, np.float32), audio, np.zeros(0, np.float32)).features

    @torch.no_grad()
    def encode_chunk(self, before: np.ndarray, chunk: np.ndarray, after: np.ndarray) -> EncodedChunk:
        """`chunk`'s features, encoded with up to `context` samples of `before` and `after` around it."""
        lead = self.on_grid(min(len(before), self.context))
        audio = np.concatenate([before[len(before) - lead:], chunk, after[:self.context]]).astype(np.float32)
        samples = torch.from_numpy(audio).to(self.device)
        trunk = self.front_end.encode(samples)
        voices = self.front_end.window_embeddings(trunk).float().cpu().numpy()
        first = lead // self.trunk_samples
        wanted = -(-len(chunk) // self.trunk_samples)
        own = trunk[first:first + wanted]
        if len(own) < wanted:  # the encoder's last frames need a little audio past the end
            own = torch.cat([own, trunk[-1:].expand(wanted - len(own), -1)])
        segmentation = None
        if self.segments:
            chunk_samples = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(self.device)
            segmentation = self.front_end.segment(chunk_samples, -(-len(chunk) // self.frame_samples))
        return EncodedChunk(FrozenFeatures(own, segmentation), voices, lead / SAMPLE_RATE)

    def cut(self, features: FrozenFeatures, begin: int, length: int) -> FrozenFeatures:
        """The features of samples [begin, begin + length) of an encoded stretch (both on the grid)."""
        trunk = slice(begin // self.trunk_samples, (begin + length) // self.trunk_samples)
        frames = slice(begin // self.frame_samples, (begin + length) // self.frame_samples)
        return features.cut(trunk, frames)

    def assemble(self, clips: list[FrozenFeatures], chunk: FrozenFeatures) -> FrozenFeatures:
        """The features of `examples.assemble_prompted_input`'s layout: clip, gap, clip, gap, ..., chunk."""
        parts = [part for clip in clips for part in (clip, self.gap)]
        return FrozenFeatures.join(parts + [chunk])


@contextmanager
def torch_threads(threads: int | None):
    """torch's CPU thread count set to `threads` (None: left alone) for the block, then restored."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class InputEncoder:
    """The front end's frozen encoders over each assembled model input (prompt clips, then the chunk),
    run before the model rather than inside it, so that the voice track and the segmentation gate read
    the chunk's part of that one pass instead of encoding the chunk again. The model's input features
    are exactly those it would compute itself.

    threads: torch CPU threads for this pass alone (None: the caller's). The encoders are large
        convolutions and LSTMs that use more cores well, while the token-by-token decoder is fastest on
        one thread. Their outputs did not depend on the thread count where measured (bitwise equal at 1
        and 2 threads: oneDNN splits the work by outputs).
    """

    def __init__(self, front_end: torch.nn.Module, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"encoder threads must be at least 1, got {threads}")
        self.front_end = front_end
        self.threads = threads
        self.device = next(front_end.parameters()).device
        self.frame_samples = int(round(SAMPLE_RATE / front_end.frame_rate))
        self.trunk_samples = int(round(SAMPLE_RATE / front_end.encoder_rate))
        self.segments = hasattr(front_end, "segment")

    @torch.no_grad()
    def encode(self, audio: np.ndarray, chunk_samples: int) -> tuple[FrozenFeatures, EncodedChunk]:
        """The features of a model input whose last `chunk_samples` are the chunk, and the chunk's part."""
        samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(self.device)
        frames = int(self.front_end.num_frames(torch.tensor([len(audio)]))[0])
        prompt_samples = len(audio) - chunk_samples
        with torch_threads(self.threads):
            trunk = self.front_end.encode(samples)
            segmentation = self.front_end.segment(samples, frames) if self.segments else None
            own_trunk = trunk[int(round(prompt_samples / self.trunk_samples)):]
            voices = (self.front_end.window_embeddings(own_trunk).float().cpu().numpy() if len(own_trunk)
                      else np.zeros((0, self.front_end.embedding_size), np.float32))  # a last chunk of a few samples
        own_segmentation = None
        if segmentation is not None:
            first = int(round(prompt_samples / self.frame_samples))
            own_segmentation = segmentation[first:first + -(-chunk_samples // self.frame_samples)]
        chunk = EncodedChunk(FrozenFeatures(own_trunk, own_segmentation), voices, 0.0)
        return FrozenFeatures(trunk, segmentation), chunk
