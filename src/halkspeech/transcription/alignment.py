"""Word timings from the decoder's cross-attention (the alignment heads) by dynamic time warping.

What openai-whisper's `whisper/timing.py` does, on the scores the engine returns with each window
(`DecodeResult.alignment`, computed in the same engine batch as the decode):
scores [heads, tokens, 1500] → frames of this window → softmax over frames → each head normalised over the
tokens (mean 0, std 1) → median filter (7 frames) → heads averaged → DTW on the negated matrix → a token's
time is the first frame its row reaches on the path → words by the tokenizer's word split → punctuation
merged into its neighbours → the reference's duration heuristics at sentence and segment boundaries.

The DTW is vectorised per row (a min-plus prefix scan, below), so no numba is needed at run time.
Batched long-form asks the engine to do the steps before the DTW on the device (engine/align.py) and gets the
cost matrix instead of the scores; sequential mode, which may time only a prefix of the text (normalised over
that prefix, as the reference), gets the scores and does them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from halkspeech.engine.align import MEDFILT_WIDTH, MEDIAN7, MEDIAN7_LIVE
from halkspeech.engine.request import Alignment
from halkspeech.model.dims import INPUT_STRIDE
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.types import Word

TOKENS_PER_SECOND = 50  # encoder positions per second: one per 2 mel frames of 10 ms
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"


@dataclass
class WordTiming:
    """A word relative to its window (mutable while punctuation is merged)."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


MEDIAN_BLOCK = 32_768  # elements per lane: 8 lanes of 128 KB stay in a core's cache (4× faster than whole rows)


def median_filter(x: np.ndarray, width: int = MEDFILT_WIDTH) -> np.ndarray:
    """Median over a sliding window of `width` (odd) along the last axis, reflect-padded: [..., F] → [..., F]."""
    half = width // 2
    frames = x.shape[-1]
    if frames <= half:
        return x  # too short to reflect-pad (as the reference)
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
    if width == 7:
        return _median7(padded.reshape(-1, frames + 6), frames).reshape(x.shape)
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.partition(windows, half, axis=-1)[..., half]


def _median7(padded: np.ndarray, frames: int) -> np.ndarray:
    """Rows [R, F + 6] → their sliding medians of 7 [R, F]: elementwise min/max over the 7 shifted copies (no
    sorting), a block of rows at a time in 8 reused buffers, so the 21 passes read and write cache, not memory."""
    rows = padded.shape[0]
    out = np.empty((rows, frames), dtype=padded.dtype)
    block = max(1, MEDIAN_BLOCK // frames)
    lanes = [np.empty((min(block, rows), frames), dtype=padded.dtype) for _ in range(8)]
    for first in range(0, rows, block):
        n = min(block, rows - first)
        p = [lane[:n] for lane in lanes]
        for k in range(7):
            np.copyto(p[k], padded[first : first + n, k : k + frames])
        spare = p[7]
        for (i, j), (keep_min, keep_max) in zip(MEDIAN7, MEDIAN7_LIVE, strict=True):
            if keep_min and keep_max:
                np.minimum(p[i], p[j], out=spare)
                np.maximum(p[i], p[j], out=p[j])
                p[i], spare = spare, p[i]
            elif keep_min:
                np.minimum(p[i], p[j], out=p[i])
            elif keep_max:
                np.maximum(p[i], p[j], out=p[j])
        out[first : first + n] = p[3]
    return out


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through x [N, M] of low summed cost; returns (rows, columns) of the path, as
    the reference's `dtw_cpu` + `backtrace`, ties included: where the diagonal and up moves cost the same, the
    reference moves left whatever that costs, so its C is not quite the minimum, and neither is this one.

    Row i of the accumulated cost C follows from row i-1 in O(M) vector work: with a[j] = min(C[i-1, j-1],
    C[i-1, j]) (infinite on that tie) and S the running sum of x[i], C[i, j] = x[i, j] + min(a[j], C[i, j-1])
    unrolls to C[i, j] = S[j] + min_{k<=j} (a[k] - S[k-1]): a prefix minimum. 200×750 takes about 3 ms."""
    x = np.asarray(cost, dtype=np.float64)
    n, m = x.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    running = np.cumsum(x, axis=1)  # S, all rows at once
    before = running - x  # S[k-1]
    a = np.empty(m)
    for i in range(1, n + 1):
        diagonal, up = acc[i - 1, :-1], acc[i - 1, 1:]
        np.minimum(diagonal, up, out=a)
        np.putmask(a, diagonal == up, np.inf)
        np.subtract(a, before[i - 1], out=a)
        np.minimum.accumulate(a, out=a)
        np.add(a, running[i - 1], out=acc[i, 1:])
    return _backtrace(acc)


def _backtrace(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk back from the corner choosing as the reference's trace does: diagonal if strictly cheapest,
    else up (i-1) if strictly cheapest, else left (j-1); the first row only goes left, the first column up.
    The choice of every cell is made at once in numpy; the walk reads it from bytes (numpy scalars per step
    made this loop most of the DTW's time)."""
    diagonal, up, left = acc[:-1, :-1], acc[:-1, 1:], acc[1:, :-1]
    choice = np.where((diagonal < up) & (diagonal < left), 0, np.where((up < diagonal) & (up < left), 1, 2))
    moves, width = choice.astype(np.uint8).tobytes(), choice.shape[1]  # move out of (i, j) at [i-1, j-1]
    i, j = acc.shape[0] - 1, acc.shape[1] - 1
    rows, cols = [], []
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            move = moves[(i - 1) * width + j - 1]
            i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    return np.array(rows[::-1]), np.array(cols[::-1])


def find_alignment(
    alignment: Alignment, tokenizer: Tokenizer, language: str | None, *, text_count: int, num_frames: int
) -> list[WordTiming]:
    """Word timings (seconds from the window start) for the first `text_count` text tokens of a window.

    The decoder is causal, so the rows for a prefix of the text are exactly those a pass over that prefix
    alone would give; only the last row (the reference's end-of-text input) is the next text token's."""
    if text_count == 0:
        return []
    text = list(alignment.text_tokens[:text_count])
    if alignment.matrix is not None:  # reduced on the device, normalised over the whole text
        matrix = alignment.matrix[: text_count + 1].numpy()
    else:
        matrix = alignment_matrix(alignment, text_count, num_frames)
    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_words([*text, tokenizer.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND  # first frame of each row on the path
    probs = alignment.text_probs[:text_count]
    return [
        WordTiming(word, tokens, float(jump_times[i]), float(jump_times[j]), sum(probs[i:j]) / (j - i))
        for word, tokens, i, j in zip(
            words, word_tokens, boundaries[:-1].tolist(), boundaries[1:].tolist(), strict=False
        )
    ]


def normalised_weights(alignment: Alignment, text_count: int, num_frames: int) -> np.ndarray:
    """The alignment heads' scores for the prompt, the first `text_count` text tokens and one more row,
    over this window's frames: softmax over frames, then each head normalised over the tokens (mean 0, std 1).
    [heads, P + k + 1, frames] float32."""
    p = alignment.prompt_len
    frames = max(1, num_frames // INPUT_STRIDE)
    if alignment.scores is None:
        raise ValueError("the engine returned a cost matrix, not scores (the request gave alignment_frames)")
    # numpy, single-threaded: small arrays, and torch's CPU thread pool may be busy with an engine
    scores = alignment.scores[:, : p + text_count + 1, :frames].float().numpy()  # a copy when float16
    weights = scores - scores.max(axis=-1, keepdims=True)  # a new array: the scores stay as they were
    np.exp(weights, out=weights)
    weights /= weights.sum(axis=-1, keepdims=True)  # softmax over frames
    weights -= weights.mean(axis=-2, keepdims=True)
    weights /= np.sqrt(np.mean(np.square(weights), axis=-2, keepdims=True))  # population std, as the reference's
    return weights


def alignment_matrix(alignment: Alignment, text_count: int, num_frames: int) -> np.ndarray:
    """The cost matrix DTW walks (negated): [k + 1, frames], the rows predicting text[0] … text[k-1] and
    end-of-text, each median-filtered over frames and averaged over the heads."""
    p = alignment.prompt_len
    weights = normalised_weights(alignment, text_count, num_frames)
    return median_filter(weights[:, p - 1 : -1]).mean(axis=0)  # the filter works per row: only rows kept


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Fold opening punctuation into the next word and closing punctuation into the previous (in place;
    emptied entries keep their place so token counts still add up)."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def _clip_sentence_ends(alignment: list[WordTiming]) -> tuple[float, float]:
    """The reference's hack: words next to sentence ends may last at most twice the median word; returns
    (median, max) durations."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - longest
    return median, longest


@dataclass(frozen=True)
class TimedSpan:
    """A segment's times and words after word timing (times absolute, in seconds)."""

    start: float
    end: float
    words: tuple[Word, ...]


def assign_words(
    spans: Sequence[tuple[float, float, int]],
    timings: list[WordTiming],
    *,
    time_offset: float,
    last_speech: float,
    median: float,
    longest: float,
) -> tuple[list[TimedSpan], float]:
    """Hand the window's words to its segments (start, end, text-token count) in order, applying the
    reference's segment-boundary heuristics; returns the spans and the new last-speech time."""
    out: list[TimedSpan] = []
    index = 0
    for start, end, count in spans:
        saved = 0
        words: list[WordTiming] = []
        while index < len(timings) and saved < count:
            t = timings[index]
            if t.word:
                at = round(time_offset + t.start, 2), round(time_offset + t.end, 2)
                words.append(WordTiming(t.word, t.tokens, *at, t.probability))
            saved += len(t.tokens)
            index += 1
        if words:
            start, end = _fit_segment(words, start, end, last_speech, median, longest)
            last_speech = end
        out.append(TimedSpan(start, end, tuple(Word(w.word, w.start, w.end, w.probability) for w in words)))
    return out, last_speech


def _fit_segment(
    words: list[WordTiming], start: float, end: float, last_speech: float, median: float, longest: float
) -> tuple[float, float]:
    """The reference's hacks at segment boundaries: the first words after a pause and overlong first/last
    words are shortened; else the segment takes its first/last word's times. Mutates `words`."""
    first, last = words[0], words[-1]
    second = words[1] if len(words) > 1 else None
    after_pause = first.end - last_speech > median * 4
    if after_pause and (first.end - first.start > longest or (second and second.end - first.start > longest * 2)):
        if second is not None and second.end - second.start > longest:
            first.end = second.start = max(second.end / 2, second.end - longest)
        first.start = max(0.0, first.end - longest)
    if start < first.end and start - 0.5 > first.start:
        first.start = max(0.0, min(first.end - median, start))
    else:
        start = first.start
    if end > last.start and end + 0.5 < last.end:
        last.end = max(last.start + median, end)
    else:
        end = last.end
    return start, end


def last_end(timed: Sequence[TimedSpan]) -> float | None:
    """The reference's `get_end`: the last word's end, else the last segment's end, else None."""
    for span in reversed(timed):
        if span.words:
            return span.words[-1].end
    return timed[-1].end if timed else None


def time_words(
    alignment: Alignment,
    tokenizer: Tokenizer,
    language: str | None,
    spans: Sequence[tuple[float, float, int]],
    *,
    num_frames: int,
    time_offset: float,
    last_speech: float,
) -> tuple[list[TimedSpan], float]:
    """One window: its segments as (start, end, text-token count), in order → timed spans with words.
    The segments' text tokens must be a prefix of the window's aligned text tokens."""
    count = sum(c for _, _, c in spans)
    timings = find_alignment(alignment, tokenizer, language, text_count=count, num_frames=num_frames)
    median, longest = _clip_sentence_ends(timings)
    merge_punctuations(timings, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
    return assign_words(
        spans, timings, time_offset=time_offset, last_speech=last_speech, median=median, longest=longest
    )
