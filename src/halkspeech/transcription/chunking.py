"""Speech regions → chunks of at most 30 s for batched decoding, cut only where nobody speaks.

Consecutive regions join while the chunk stays within `max_s` (the pauses between them come along); a
region longer than `max_s` is cut at its least speech-like moment (the lowest smoothed VAD probability in
the second half of the allowed span), so a cut lands between words, not inside one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from halkspeech.audio.vad import FRAME_S
from halkspeech.model.dims import CHUNK_LENGTH


@dataclass(frozen=True)
class Chunk:
    """A span of the file decoded as one window: [start, end) in seconds, absolute."""

    index: int
    start: float
    end: float
    speech: float  # seconds of (padded) speech regions inside

    @property
    def duration(self) -> float:
        return self.end - self.start


def split_region(
    start: float, end: float, probs: np.ndarray, max_s: float = CHUNK_LENGTH, smooth_frames: int = 3
) -> list[tuple[float, float]]:
    """Cut one region into pieces of at most max_s at the quietest frames: each cut is the frame of lowest
    probability (averaged over `smooth_frames` ≈ 100 ms) between max_s / 2 and max_s after the piece's start."""
    kernel = np.ones(smooth_frames, dtype=np.float32) / smooth_frames
    smooth = np.convolve(probs, kernel, mode="same") if len(probs) >= smooth_frames else probs
    pieces = []
    while end - start > max_s:
        lo = int(np.ceil((start + max_s / 2) / FRAME_S))
        hi = int((start + max_s) / FRAME_S)  # frame hi starts at or before start + max_s
        window = smooth[lo:hi]
        # latest of the quietest frames (a longer piece means fewer chunks); no VAD there: cut at max_s
        at = lo + len(window) - 1 - int(np.argmin(window[::-1])) if len(window) else hi
        cut = min(max((at + 0.5) * FRAME_S, start + FRAME_S), start + max_s)  # mid-frame
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def make_chunks(regions: list[tuple[float, float]], probs: np.ndarray, max_s: float = CHUNK_LENGTH) -> list[Chunk]:
    """Sorted, disjoint speech regions (seconds) and the per-frame VAD probabilities → chunks in order."""
    pieces = [piece for s, e in regions for piece in split_region(s, e, probs, max_s)]
    spans: list[list[float]] = []  # [start, end, speech]
    for s, e in pieces:
        if spans and e - spans[-1][0] <= max_s:
            spans[-1][1] = e
            spans[-1][2] += e - s
        else:
            spans.append([s, e, e - s])
    return [Chunk(i, s, e, sp) for i, (s, e, sp) in enumerate(spans)]
