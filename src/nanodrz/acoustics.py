"""What happens to speech between the mouth and the file: rooms, background noise, telephone lines.

Everything here is built once and reused, because the simulator must mix about a hundred
conversations per second per core: noise comes from long precomputed buffers read at random
offsets, room impulse responses (RIRs) are simulated once with pyroomacoustics and cached on disk,
and filters are designed once.
"""

from __future__ import annotations

import fnmatch
import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile as sf
import soxr
from scipy.signal import butter, sosfilt
from tqdm import tqdm

from nanodrz.audio import SAMPLE_RATE
from nanodrz.fileio import atomic_open
from nanodrz.paths import cache_dir

COLOURED_NOISES = ("white", "pink", "brown")
NOISE_TYPES = (*COLOURED_NOISES, "babble", "music")
CODECS = ("none", "mulaw", "gsm")
NOISE_BUFFER_SECONDS = 60.0  # length of every noise buffer (noise, music, babble), read at random offsets

# The room bank's recipe. The bank is simulated once and cached under a name that carries
# RIR_BANK_VERSION, so these are facts of version 1: changing one needs a new version, not a setting.
RIR_BANK_VERSION = 1
ROOM_RT60_RANGE = (0.15, 1.0)
SOURCES_PER_ROOM = 8
MAX_RIR_SECONDS = 0.5
RIR_TAIL_DB = 40.0
SPEED_OF_SOUND = 343.0
MAX_IMAGE_ORDER = 50

TELEPHONE_RATE = 8000


# --------------------------------------------------------------------------------------------------
# Background noise


@functools.lru_cache(maxsize=None)
def coloured_noise(colour: str, seconds: float = NOISE_BUFFER_SECONDS) -> np.ndarray:
    """Unit-RMS noise with a 1/f^k power spectrum (white k=0, pink k=1, brown k=2), made once per process.

    Built by shaping the spectrum of white noise, with a fixed seed so every process and worker holds
    the same buffer; variety comes from reading it at random offsets.
    """
    exponent = {"white": 0.0, "pink": 1.0, "brown": 2.0}[colour]
    length = int(seconds * SAMPLE_RATE)
    white = np.random.default_rng(COLOURED_NOISES.index(colour)).standard_normal(length)
    if exponent == 0.0:
        shaped = white
    else:
        spectrum = np.fft.rfft(white)
        frequencies = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
        # below 20 Hz the spectrum is held flat so brown noise does not drift like a DC offset
        spectrum /= np.maximum(frequencies, 20.0) ** (exponent / 2)
        shaped = np.fft.irfft(spectrum, length)
    shaped /= np.sqrt(np.mean(shaped**2))
    return shaped.astype(np.float32)


def music_clips(directories: tuple[str, ...], max_seconds: float = NOISE_BUFFER_SECONDS) -> tuple[np.ndarray, ...]:
    """Unit-RMS music at 16 kHz from audio files found in `directories` (e.g. Asterisk's music on hold)."""
    return sound_clips(directories, max_seconds=max_seconds)


@functools.lru_cache(maxsize=8)
def sound_clips(directories: tuple[str, ...], exclude: tuple[str, ...] = (), min_seconds: float = 1.0,
                max_seconds: float = NOISE_BUFFER_SECONDS) -> tuple[np.ndarray, ...]:
    """Unit-RMS clips at 16 kHz from the audio files in `directories` whose names match no `exclude` pattern.

    Files shorter than `min_seconds` are skipped. At most `max_seconds` of each file is kept (from
    10 s in, past any intro, when the file is long enough), which bounds the memory every DataLoader
    worker spends on recorded sounds.
    """
    clips = []
    for directory in directories:
        for path in sorted(Path(directory).glob("*")):
            if path.suffix.lower() not in (".wav", ".flac", ".ogg", ".oga"):
                continue
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in exclude):
                continue
            try:
                info = sf.info(str(path))
                start = int(min(10.0, max(0.0, info.duration - max_seconds)) * info.samplerate)
                audio, rate = sf.read(str(path), start=start, frames=int(max_seconds * info.samplerate),
                                      dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError):
                continue
            audio = audio.mean(axis=1)
            if rate != SAMPLE_RATE:
                audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
            rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
            if audio.size >= min_seconds * SAMPLE_RATE and rms > 1e-4:
                clips.append(np.ascontiguousarray(audio / rms, dtype=np.float32))
    return tuple(clips)


def available_music(directories: tuple[str, ...]) -> bool:
    return bool(music_clips(directories))


def fade_ends(signal: np.ndarray, seconds: float) -> np.ndarray:
    """Raised-cosine fade in and out over `seconds` (at most half the signal each), in place; returns `signal`.

    A sound cut out of a longer one would otherwise start and stop with a click.
    """
    samples = min(int(seconds * SAMPLE_RATE), signal.size // 2)
    if samples:
        ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, samples))).astype(np.float32)
        signal[:samples] *= ramp
        signal[signal.size - samples:] *= ramp[::-1]
    return signal


def loop_slice(buffer: np.ndarray, offset: int, length: int) -> np.ndarray:
    """`length` samples of `buffer` from `offset`, wrapping around; a view when no wrap is needed."""
    offset %= buffer.size
    if offset + length <= buffer.size:
        return buffer[offset:offset + length]
    whole, rest = divmod(length - (buffer.size - offset), buffer.size)
    return np.concatenate([buffer[offset:], *([buffer] * whole), buffer[:rest]])


# --------------------------------------------------------------------------------------------------
# Rooms


class Reverb:
    """Convolution with one RIR by overlap-add, its spectrum computed once.

    Blocks of a fixed FFT size (the power of two at or above twice the RIR) keep the transforms
    small and let the RIR's spectrum be reused for every slice of speech; this is about twice as
    fast as `scipy.signal.oaconvolve`, which transforms the RIR again on each call.
    """

    def __init__(self, taps: np.ndarray):
        self.taps = taps
        self.nfft = max(4096, 1 << int(np.ceil(np.log2(2 * taps.size))))
        self.spectrum = scipy.fft.rfft(taps, self.nfft)

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """float32 `audio` convolved with the RIR (longer by the RIR's tail)."""
        step = self.nfft - self.taps.size + 1
        blocks = -(-audio.size // step)
        padded = np.zeros(blocks * step, dtype=np.float32)
        padded[: audio.size] = audio
        spectra = scipy.fft.rfft(padded.reshape(blocks, step), self.nfft, axis=1)
        spectra *= self.spectrum
        wet = scipy.fft.irfft(spectra, self.nfft, axis=1)
        out = np.zeros((blocks + 1) * step, dtype=np.float32)
        out[: blocks * step] += wet[:, :step].ravel()
        out[step:].reshape(blocks, step)[:, : self.taps.size - 1] += wet[:, step:]
        return out[: audio.size + self.taps.size - 1]


@dataclass(frozen=True)
class RirBank:
    """Simulated rooms: `rirs[room, source]` is a unit-energy RIR starting at its direct path."""

    rirs: np.ndarray  # (rooms, sources, max_length) float32, zero-padded
    lengths: np.ndarray  # (rooms, sources) int
    rt60: np.ndarray  # (rooms,) reverberation time measured on the stored RIRs (T20, extrapolated)
    design_rt60: np.ndarray  # (rooms,) the RT60 the room's absorption was chosen for (Sabine)
    _reverbs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_rooms(self) -> int:
        return int(self.rirs.shape[0])

    def rir(self, room: int, source: int) -> np.ndarray:
        return self.rirs[room, source, : self.lengths[room, source]]

    def reverb(self, room: int, source: int) -> Reverb:
        """The convolver of one RIR, made on first use and kept."""
        key = (room, source)
        if key not in self._reverbs:
            self._reverbs[key] = Reverb(self.rir(room, source))
        return self._reverbs[key]

    def rooms_within(self, low: float, high: float) -> np.ndarray:
        """Rooms whose RT60 lies in [low, high]; the closest room when none does."""
        inside = np.flatnonzero((self.rt60 >= low) & (self.rt60 <= high))
        if inside.size:
            return inside
        return np.asarray([int(np.argmin(np.abs(self.rt60 - (low + high) / 2)))])


def rir_bank_path(num_rooms: int, seed: int = 0) -> Path:
    return cache_dir() / "rirs" / f"rooms-v{RIR_BANK_VERSION}-n{num_rooms}-seed{seed}.npz"


def load_rir_bank(num_rooms: int, seed: int = 0) -> RirBank:
    """The cached bank of `num_rooms` rooms, simulated (once, deterministically) if not on disk yet."""
    return _load_rir_bank(rir_bank_path(num_rooms, seed), num_rooms, seed)


@functools.lru_cache(maxsize=4)
def _load_rir_bank(path: Path, num_rooms: int, seed: int) -> RirBank:
    if not path.is_file():
        bank = simulate_rooms(num_rooms, seed)
        with atomic_open(path, "wb") as handle:
            np.savez(handle, rirs=bank.rirs, lengths=bank.lengths, rt60=bank.rt60, design_rt60=bank.design_rt60)
    with np.load(path) as data:
        return RirBank(data["rirs"], data["lengths"], data["rt60"], data["design_rt60"])


def simulate_rooms(num_rooms: int, seed: int = 0) -> RirBank:
    """Shoebox rooms by the image-source method, RT60s spread evenly over ROOM_RT60_RANGE."""
    import pyroomacoustics as pra

    rng = np.random.default_rng(seed)
    low, high = ROOM_RT60_RANGE
    max_length = int(MAX_RIR_SECONDS * SAMPLE_RATE)
    rirs = np.zeros((num_rooms, SOURCES_PER_ROOM, max_length), dtype=np.float32)
    lengths = np.zeros((num_rooms, SOURCES_PER_ROOM), dtype=np.int64)
    rt60 = np.zeros(num_rooms)
    design = low + (np.arange(num_rooms) + rng.uniform(size=num_rooms)) / num_rooms * (high - low)
    for room_index in tqdm(range(num_rooms), desc="simulating rooms (once)", unit="room", leave=False):
        while True:
            length = rng.uniform(3.0, 10.0)
            dims = np.array([length, rng.uniform(2.5, min(length, 8.0)), rng.uniform(2.4, 4.0)])
            try:
                absorption, sabine_order = pra.inverse_sabine(design[room_index], dims)
            except ValueError:
                continue  # the RT60 is out of reach for this room size: draw another room
            break
        needed_order = int(np.ceil(SPEED_OF_SOUND * MAX_RIR_SECONDS / dims.min())) + 1
        room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(absorption),
                           max_order=int(min(sabine_order, needed_order, MAX_IMAGE_ORDER)))
        margin = np.array([0.5, 0.5, 1.0])
        microphone = rng.uniform(margin, dims - margin)
        room.add_microphone(microphone)
        sources = [rng.uniform([0.5, 0.5, 1.2], dims - [0.5, 0.5, 0.6]) for _ in range(SOURCES_PER_ROOM)]
        for position in sources:
            room.add_source(position)
        room.compute_rir()
        decays = []
        for source, raw in enumerate(room.rir[0]):
            # pyroomacoustics centres each arrival in a fractional-delay filter, hence the half length
            direct = (np.linalg.norm(sources[source] - microphone) / pra.constants.get("c") * SAMPLE_RATE
                      + pra.constants.get("frac_delay_length") // 2)
            rir = _trim_rir(np.asarray(raw, dtype=np.float64), int(round(direct)))
            rirs[room_index, source, : rir.size] = rir
            lengths[room_index, source] = rir.size
            decays.append(pra.experimental.measure_rt60(rir, fs=SAMPLE_RATE, decay_db=20))
        rt60[room_index] = float(np.median(decays))
    return RirBank(rirs, lengths, rt60, design)


def _trim_rir(rir: np.ndarray, direct: int) -> np.ndarray:
    """Start at the direct path (sample `direct`; so reference times need no shift), end where the tail is 40 dB down.

    The direct path is located from the geometry, not the largest peak: far from the microphone,
    coinciding reflections can be stronger. Scaled to unit energy, so convolving keeps a signal's
    level and the mixing gains stay meaningful.
    """
    start = max(direct - 8, 0)
    rir = rir[start:start + int(MAX_RIR_SECONDS * SAMPLE_RATE)]
    energy_left = np.cumsum(rir[::-1] ** 2)[::-1]
    end = int(np.searchsorted(-energy_left, -energy_left[0] * 10 ** (-RIR_TAIL_DB / 10)))
    rir = rir[: max(end, 1)]
    return (rir / np.sqrt(np.sum(rir**2))).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Telephone line


@functools.lru_cache(maxsize=1)
def _telephone_band() -> np.ndarray:
    return butter(4, [300, 3400], btype="bandpass", fs=TELEPHONE_RATE, output="sos")


def telephone(audio: np.ndarray, codec: str) -> np.ndarray:
    """A narrow-band call: 8 kHz, 300-3400 Hz, then an optional codec (mu-law or GSM 06.10), back at 16 kHz."""
    narrow = soxr.resample(audio, SAMPLE_RATE, TELEPHONE_RATE, quality="HQ")
    narrow = sosfilt(_telephone_band(), narrow).astype(np.float32)
    if codec == "mulaw":
        narrow = mu_law(narrow)
    elif codec == "gsm":
        narrow = gsm(narrow)
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    wide = soxr.resample(narrow, TELEPHONE_RATE, SAMPLE_RATE, quality="HQ")
    out = np.zeros(audio.size, dtype=np.float32)
    out[: min(audio.size, wide.size)] = wide[: audio.size]
    return out


def mu_law(audio: np.ndarray, mu: float = 255.0) -> np.ndarray:
    """G.711 mu-law round trip: compress, quantise to 8 bits, expand."""
    clipped = np.clip(audio, -1.0, 1.0)
    compressed = np.sign(clipped) * np.log1p(mu * np.abs(clipped)) / np.log1p(mu)
    quantised = np.round(compressed * 127.0) / 127.0
    return (np.sign(quantised) * np.expm1(np.abs(quantised) * np.log1p(mu)) / mu).astype(np.float32)


def gsm(audio: np.ndarray) -> np.ndarray:
    """GSM 06.10 full-rate round trip through libsndfile (8 kHz in, 8 kHz out)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), TELEPHONE_RATE, format="WAV", subtype="GSM610")
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32")
    out = np.zeros(audio.size, dtype=np.float32)
    out[: min(audio.size, decoded.size)] = decoded[: audio.size]
    return out
