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
from torch import Tensor

from halkspeech.engine.transfer import to_device

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


def _median7(padded: Tensor, frames: int) -> Tensor:
    """[..., frames + 6] → [..., frames]: the median of each 7 consecutive values, by the min/max network on 7
    shifted views (21 elementwise kernels, no sorting)."""
    p = [padded[..., k : k + frames] for k in range(7)]
    for (i, j), (keep_min, keep_max) in zip(MEDIAN7, MEDIAN7_LIVE, strict=True):
        low = torch.minimum(p[i], p[j]) if keep_min else p[i]
        if keep_max:
            p[j] = torch.maximum(p[i], p[j])
        p[i] = low
    return p[3]


def cost_matrices(scores: Tensor, prompt_len: int, text_lens: Sequence[int], frames: Sequence[int]) -> Tensor:
    """Several windows at once, in a fixed number of kernels (each torch call on the engine thread is a GIL
    hand-off; a pass per window was ~45 calls a window):
    scores [B, heads, ≥ prompt_len + max(text_lens) + 1, ≥ max(frames)] (scaled q·k) → [B, max(text_lens) + 1,
    max(frames)] float32, window b's cost matrix in [:text_lens[b] + 1, :frames[b]] (the rest is padding)."""
    rows, width = prompt_len + max(text_lens) + 1, max(frames)
    sizes = to_device(
        [[prompt_len + k + 1, f] for k, f in zip(text_lens, frames, strict=True)], torch.long, scores.device
    )
    return padded_cost_matrices(scores, prompt_len, sizes, rows, width)


def padded_cost_matrices(scores: Tensor, prompt_len: int, sizes: Tensor, rows: int, width: int) -> Tensor:
    """`cost_matrices` with the sizes on the device and the shapes fixed by the caller, so that a CUDA graph can
    capture it: sizes [B, 2] (each window's prompt + text + end-of-text tokens, and its frames), scores [B,
    heads, ≥ rows, ≥ width] → [B, rows - prompt_len, width]. Padding rows and frames change nothing inside a
    window's own [:text + 1, :frames]: every reduction is masked to them and the median filter reflects at the
    window's own last frame."""
    device = scores.device
    n_rows, n_frames = sizes[:, 0, None], sizes[:, 1, None]  # [B, 1] each
    column = torch.arange(width, device=device)
    # softmax over each window's own frames (zero beyond them)
    x = scores[:, :, :rows, :width].float().masked_fill((column >= n_frames)[:, None, None, :], float("-inf"))
    x = x.softmax(dim=-1)
    # each head normalised over each window's own rows (mean 0, population std 1)
    valid = (torch.arange(rows, device=device) < n_rows)[:, None, :, None].float()  # [B, 1, R, 1]
    count = n_rows[:, :, None, None].float()
    mean = (x * valid).sum(dim=-2, keepdim=True) / count
    std = (((x - mean) * valid).square().sum(dim=-2, keepdim=True) / count).sqrt()
    # in place: each [B, heads, rows, width] temporary is held for good in an alignment graph's memory pool
    x = x.sub_(mean).div_(std)[:, :, prompt_len - 1 : rows - 1]  # the rows that predict text and end-of-text
    # median filter over frames, reflect-padded at each window's own last frame (one gather)
    half = MEDFILT_WIDTH // 2
    source = torch.arange(-half, width + half, device=device).abs()[None, :]  # [1, W + 6]
    last = n_frames - 1
    source = torch.where(source > last, 2 * last - source, source).clamp(0, width - 1)  # [B, W + 6]
    padded = x.gather(-1, source[:, None, None, :].expand(*x.shape[:-1], width + 2 * half))
    filtered = torch.where((n_frames <= half)[:, None, None, :], x, _median7(padded, width))  # too short: as is
    return filtered.mean(dim=1)
