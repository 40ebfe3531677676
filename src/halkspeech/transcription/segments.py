"""A decoded window's tokens → timed segments, and how far the seek moves (the reference's rules)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from halkspeech.model.dims import HOP_LENGTH, INPUT_STRIDE, SAMPLE_RATE, TIME_PRECISION

if TYPE_CHECKING:
    from halkspeech.model.tokenizer import Tokenizer


def compression_ratio(text: str) -> float:
    """gzip-style compressibility of the text: repetitive (hallucinated) output compresses very well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class RawSegment:
    start: float  # seconds, absolute
    end: float
    tokens: tuple[int, ...]  # including the timestamp tokens that delimit it

    def text(self, tokenizer: Tokenizer) -> str:
        """The segment's words (its timestamps and any end-of-text left out by Tokenizer.decode)."""
        return tokenizer.decode(list(self.tokens))


def split_window(
    tokens: tuple[int, ...],
    *,
    timestamp_begin: int,
    time_offset: float,
    segment_frames: int,
) -> tuple[list[RawSegment], int]:
    """Cut a window's tokens at consecutive timestamp pairs into segments; returns them and the number
    of mel frames to advance the seek by.

    Without a completed pair the whole window is one segment, ending at its last timestamp if any."""
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        segments, last = [], 0
        for cut in cuts:
            piece = tokens[last:cut]
            end = time_offset + (piece[-1] - timestamp_begin) * TIME_PRECISION
            # a piece starts at a timestamp, but for the first, whose text may come first where no rule forced
            # one (without_timestamps, then sampled timestamps; a text token read as one gave start -650 s): it
            # starts with the window; and unordered sampled timestamps must not end a segment before it starts
            start = time_offset + (piece[0] - timestamp_begin) * TIME_PRECISION if is_ts[last] else time_offset
            segments.append(RawSegment(start=min(start, end), end=end, tokens=piece))
            last = cut
        if single_ending:
            return segments, segment_frames  # no speech after the last timestamp: take the whole window
        # otherwise the last segment is unfinished: seek to its start and decode it again
        return segments, (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE
    duration = segment_frames * HOP_LENGTH / SAMPLE_RATE
    stamps = [t for t in tokens if t >= timestamp_begin]
    if stamps and stamps[-1] != timestamp_begin:
        duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION
    return [RawSegment(time_offset, time_offset + duration, tokens)], segment_frames
