"""The device half of word timing: the alignment heads' scores → the cost matrix DTW walks.

The same steps as openai-whisper's `find_alignment` before its DTW (and as the host path in
transcription/alignment.py, which sequential mode uses): keep the window's frames, softmax over them,
normalise each head over the tokens (mean 0, population std 1), keep the rows that predict the text and
end-of-text, median-filter each row over 7 frames (reflect-padded), average the heads. Run on the device
inside the engine's alignment pass, it replaces a [heads, tokens, 1500] host copy and the host's softmax and
median filter (most of word timing's host time, bench/NOTES.md) with a [tokens, frames] copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MEDFILT_WIDTH = 7

# Devillard's median-of-7 network ("Fast median search", 1998): 13 compare-exchanges leave the median in p[3].
MEDIAN7 = ((0, 5), (0, 3), (1, 6), (2, 4), (0, 1), (3, 5), (2, 6), (2, 3), (3, 6), (4, 5), (1, 4), (1, 3), (3, 4))


def _live_outputs(network: Sequence[tuple[int, int]], result: int) -> tuple[tuple[bool, bool], ...]:
    """For each compare-exchange (i, j), whether its min (left in p[i]) and max (in p[j]) are read later."""
    live, flags = {result}, []
    for i, j in reversed(network):
        flags.append((i in live, j in live))
        if i in live or j in live:
            live.update((i, j))
    return tuple(reversed(flags))


MEDIAN7_LIVE = _live_outputs(MEDIAN7, 3)  # 5 of the 26 min/max results are never read: skipped


def median_filter(x: Tensor, width: int = MEDFILT_WIDTH) -> Tensor:
    """Median over a sliding window of `width` (odd) along the last axis, reflect-padded: [H, R, F] → same.
    Too short to reflect-pad (F ≤ width // 2): unchanged, as the reference.

    Width 7 (the one used) runs the min/max network on 7 shifted views: 21 elementwise kernels. torch.median
    over the unfolded windows was measured at ~25 ms a window on an H100 (a selection per 7 elements)."""
    half = width // 2
    frames = x.shape[-1]
    if frames <= half:
        return x
    padded = F.pad(x, (half, half), mode="reflect")
    if width != 7:
        return padded.unfold(-1, width, 1).sort(dim=-1).values[..., half]
    p = [padded[..., k : k + frames] for k in range(7)]
    for (i, j), (keep_min, keep_max) in zip(MEDIAN7, MEDIAN7_LIVE, strict=True):
        low = torch.minimum(p[i], p[j]) if keep_min else p[i]
        if keep_max:
            p[j] = torch.maximum(p[i], p[j])
        p[i] = low
    return p[3]


def cost_matrix(scores: Tensor, prompt_len: int, text_len: int, frames: int) -> Tensor:
    """scores [heads, ≥ prompt_len + text_len + 1, ≥ frames] (scaled q·k) → [text_len + 1, frames] float32:
    the rows predicting text[0] … text[-1] and end-of-text, to be negated for DTW."""
    weights = scores[:, : prompt_len + text_len + 1, :frames].float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std
    return median_filter(weights[:, prompt_len - 1 : -1]).mean(dim=0)
