"""Voice activity detection with Silero VAD (the `silero-vad` package's 16 kHz network), batched over a file.

The streaming model reads one 512-sample frame (32 ms) at a time, prefixed by the previous frame's last 64
samples, and carries an LSTM state from frame to frame. Only the LSTM is recurrent: the convolutional front
end sees one frame at a time. So `SpeechDetector.probabilities` runs the front end over every frame of the
file in one batched call, then cuts the frame sequence into equal rows that run side by side through one
`nn.LSTM` call (each row a recurrent state of its own, warmed up on the 4 s before its first frame), on the
GPU when asked. An hour of audio is 112,500 frames: 220 rows of 512 frames (+128 warm-up), 640 LSTM steps in
one cuDNN call, not 112,500 Python steps. One row is silero's streaming model exactly (|Δp| < 4e-6); with rows,
on the 52 s dev file, mean |Δp| is 0.001 and 6 of 1,639 frames change side of 0.5 (with a 1 s warm-up: 0.005 and 9).

The weights come from the package's TorchScript file (v6; its `silero_vad_16k.safetensors` for tinygrad
holds an older, different set). `silero_jit_path` finds the file without importing `silero_vad`: the package's
import sets torch's thread count to 1 for the importing thread and for every thread started after it (an engine
thread started later would run single-threaded).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from halkspeech.errors import ModelLoadError
from halkspeech.model.dims import SAMPLE_RATE


def silero_jit_path() -> Path:
    """The silero-vad package's TorchScript model, located without running the package's __init__."""
    spec = find_spec("silero_vad")  # a top-level name: found, not imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "silero_vad.jit"
        if path.is_file():
            return path
    raise ModelLoadError("the silero-vad package (voice activity detection) is missing: pip install silero-vad")


FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame each frame also sees
FRAME_S = FRAME / SAMPLE_RATE


class SileroNet(nn.Module):
    """Silero VAD v5/v6 at 16 kHz: STFT as a convolution, four convolutions, an LSTM, a sigmoid head."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)  # real+imag of 129 bins
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def frame_features(self, frames: Tensor) -> Tensor:
        """Frames with their context [N, CONTEXT + FRAME] → front-end features [N, 128] (no state)."""
        x = F.pad(frames[:, None], (0, CONTEXT), mode="reflect")  # [N, 1, 640]
        x = self.stft_conv(x)  # [N, 258, 4]
        magnitude = (x[:, :129] ** 2 + x[:, 129:] ** 2).sqrt()
        x = F.relu(self.conv1(magnitude))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.conv4(x))[:, :, 0]  # two stride-2 convolutions: 4 positions → 1

    def recurrent(self, features: Tensor) -> Tensor:
        """Features of consecutive frames [B, T, 128] → speech probabilities [B, T], zero initial state."""
        hidden, _ = self.lstm(features)  # [B, T, 128]
        logits = self.final_conv(F.relu(hidden).transpose(1, 2))  # [B, 1, T]
        return torch.sigmoid(logits)[:, 0]

    @classmethod
    def from_package(cls) -> SileroNet:
        """The 16 kHz weights of `silero_vad.jit` (what the package's `load_silero_vad()` runs), renamed."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: only to read the weights
            scripted = torch.jit.load(str(silero_jit_path()), map_location="cpu")._model.state_dict()
        state = {"stft_conv.weight": scripted["stft.forward_basis_buffer"]}
        for i in range(4):
            for kind in ("weight", "bias"):
                state[f"conv{i + 1}.{kind}"] = scripted[f"encoder.{i}.reparam_conv.{kind}"]
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            state[f"lstm.{kind}_l0"] = scripted[f"decoder.rnn.{kind}"]  # its LSTMCell ≡ a one-layer LSTM
        state |= {f"final_conv.{k}": scripted[f"decoder.decoder.2.{k}"] for k in ("weight", "bias")}
        net = cls()
        net.load_state_dict(state, strict=True)
        return net.eval()


@cache
def _net(device: torch.device) -> SileroNet:
    return SileroNet.from_package().to(device)


@dataclass(frozen=True)
class VadOptions:
    """How speech probabilities become speech regions (silero's names and defaults where they apply)."""

    threshold: float = 0.5  # a frame at or above this starts or continues speech
    neg_threshold: float | None = None  # speech continues while at or above this (default threshold - 0.15)
    min_speech_s: float = 0.25  # shorter regions are dropped
    min_silence_s: float = 0.3  # shorter pauses do not end a region
    pad_s: float = 0.2  # each region grows by this much on both sides (never past the audio)


class SpeechDetector:
    """Silero VAD loaded once per device; `probabilities` is thread-safe (inference only)."""

    def __init__(self, *, row_frames: int = 512, warmup_frames: int = 128, block_frames: int = 16384) -> None:
        self.row_frames = row_frames  # frames per LSTM row (512 × 32 ms ≈ 16 s)
        self.warmup_frames = warmup_frames  # frames each row sees before its own (state warm-up, 4 s)
        self.block_frames = block_frames  # front-end frames per call, bounding its memory (~60 MB)

    @torch.inference_mode()
    def probabilities(self, audio: np.ndarray | Tensor, device: torch.device | str = "cpu") -> np.ndarray:
        """Speech probability of each 512-sample frame of 16 kHz audio [T] → [ceil(T / 512)] float32."""
        device = torch.device(device)
        net = _net(device)
        samples = torch.as_tensor(audio, dtype=torch.float32).to(device)
        n = math.ceil(samples.numel() / FRAME)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        padded = F.pad(samples, (CONTEXT, n * FRAME - samples.numel()))  # zeros before frame 0 and after the end
        frames = padded.unfold(0, CONTEXT + FRAME, FRAME)  # [n, 576], a view
        features = torch.cat([net.frame_features(b) for b in frames.split(self.block_frames)])  # [n, 128]
        out = net.recurrent(self._rows(features))  # [R, W + L]
        probs = torch.cat([out[:1, : self.row_frames], out[1:, self.warmup_frames :]])  # [R, L]
        return probs.reshape(-1)[:n].float().cpu().numpy()

    def _rows(self, features: Tensor) -> Tensor:
        """Cut [n, 128] into rows of row_frames, each preceded by the warmup_frames before it: row r covers
        frames r·L - W … (r+1)·L. Row 0 starts at frame 0 from a zero state, as the streaming model does,
        and carries its W extra frames at its end instead (their outputs are dropped with the others')."""
        n = features.shape[0]
        length, warm = self.row_frames, self.warmup_frames
        count = math.ceil(n / length)
        padded = F.pad(features, (0, 0, warm, count * length - n + warm))  # [W + count·L + W, 128]
        rows = padded.unfold(0, warm + length, length).transpose(1, 2)[:count].clone()  # [count, W + L, 128]
        rows[0] = padded[warm : 2 * warm + length]
        return rows


VAD_PEAK = 0.1  # -20 dBFS: the level quiet recordings are raised to for the VAD
VAD_MAX_GAIN = 100.0  # +40 dB at most: dither and hiss stay far below speech


def vad_gain(peak: float, max_gain: float = VAD_MAX_GAIN) -> float:
    """The gain that brings audio peaking at `peak` to -20 dBFS for silero, at most `max_gain`; 1 for louder
    audio or silence. silero's speech probabilities follow the level: jfk.flac peaking at -50 dBFS had almost
    no frame above 0.5, at -61 none, while Whisper (its log-mel normalised to the loudest part) hears both."""
    if peak <= 0.0 or peak >= VAD_PEAK:
        return 1.0
    return min(VAD_PEAK / peak, max_gain)


DC_TOLERANCE = 1e-3  # a mean offset at least this large is taken off the VAD's input
_LOUDEST_SKIPPED = 1 / 200  # of the frames: a click, a pop, a bumped microphone are not the speech's level


def level(audio: np.ndarray) -> tuple[float, float]:
    """(offset, peak) of a recording [T]: its mean (a DC offset), and its peak about that mean, leaving out the
    loudest 0.5% of 32 ms frames (at least one) so that one click does not set the level of quiet speech.
    Reads frame maxima and minima: no |audio| copy of hours."""
    if audio.size == 0:
        return 0.0, 0.0
    offset = float(audio.mean(dtype=np.float64))
    whole = len(audio) // FRAME * FRAME
    if whole == 0:
        return offset, max(float(audio.max()) - offset, offset - float(audio.min()))
    frames = audio[:whole].reshape(-1, FRAME)
    peaks = np.maximum(frames.max(axis=1) - offset, offset - frames.min(axis=1))
    skipped = max(1, int(len(peaks) * _LOUDEST_SKIPPED))
    if len(peaks) <= skipped:
        return offset, float(peaks.max())
    return offset, float(np.partition(peaks, len(peaks) - skipped - 1)[len(peaks) - skipped - 1])


def raised_for_vad(audio: np.ndarray) -> np.ndarray:
    """A quiet recording [T] raised for silero as a whole (`vad_gain` of its `level`; batched mode dropped
    speech peaking at -61 dBFS whole, and quiet speech after one loud click), its DC offset taken off first
    (under a 0.3 offset it heard nothing), clipped to ±1. Louder audio without an offset is returned as is."""
    offset, peak = level(audio)
    gain = vad_gain(peak)
    shift = abs(offset) >= DC_TOLERANCE
    if gain == 1.0 and not shift:
        return audio
    raised = audio - np.float32(offset) if shift else audio.copy()  # the one copy
    raised *= np.float32(gain)
    return np.clip(raised, -1.0, 1.0, out=raised)


def speech_regions(
    probs: np.ndarray, duration_s: float, options: VadOptions = VadOptions()
) -> list[tuple[float, float]]:
    """Per-frame probabilities → speech regions [(start_s, end_s)], sorted, disjoint, inside [0, duration_s].

    Hysteresis as silero's: a region is a run of frames at or above neg_threshold that holds at least one
    frame at or above threshold; pauses shorter than min_silence_s are bridged, short regions dropped,
    then every region is padded by pad_s and overlapping ones merged."""
    low = options.neg_threshold if options.neg_threshold is not None else max(options.threshold - 0.15, 0.01)
    above = probs >= low
    if not above.any():
        return []
    edges = np.diff(np.concatenate(([0], above.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # frame runs [start, end)
    peak = np.maximum.reduceat(probs, starts)  # each run's highest probability
    keep = peak >= options.threshold
    starts, ends = starts[keep], ends[keep]
    regions: list[list[float]] = []
    for s, e in zip((starts * FRAME_S).tolist(), (ends * FRAME_S).tolist(), strict=True):
        if regions and s - regions[-1][1] < options.min_silence_s:
            regions[-1][1] = e
        else:
            regions.append([s, e])
    padded: list[tuple[float, float]] = []
    for s, e in regions:
        if e - s < options.min_speech_s:
            continue
        s, e = max(0.0, s - options.pad_s), min(duration_s, e + options.pad_s)
        if padded and s <= padded[-1][1]:
            padded[-1] = (padded[-1][0], e)
        else:
            padded.append((s, e))
    return padded
