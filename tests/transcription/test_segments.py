"""A window's tokens cut into segments at timestamp pairs (segments.split_window)."""

from __future__ import annotations

from halkspeech.transcription.segments import split_window

TB = 50364  # timestamp_begin of tiny.en: <|0.00|>; <|k × 0.02|> is TB + k


def split(tokens: tuple[int, ...], offset: float = 30.0) -> tuple[list[tuple[float, float, int]], int]:
    raw, advance = split_window(tokens, timestamp_begin=TB, time_offset=offset, segment_frames=3000)
    return [(round(r.start, 2), round(r.end, 2), len(r.tokens)) for r in raw], advance


def test_pairs_cut_segments_and_a_single_ending_takes_the_window() -> None:
    # <|0.00|> a b <|2.00|><|2.00|> c <|5.00|>
    assert split((TB, 1, 2, TB + 100, TB + 100, 3, TB + 250)) == ([(30.0, 32.0, 4), (32.0, 35.0, 3)], 3000)


def test_an_unfinished_last_segment_seeks_to_its_start() -> None:
    # <|0.00|> a <|1.00|><|1.00|> b (no closing timestamp): seek to 1.00 s, 100 mel frames
    assert split((TB, 1, TB + 50, TB + 50, 2)) == ([(30.0, 31.0, 3)], 100)


def test_text_before_the_first_timestamp_starts_with_the_window() -> None:
    """Without the timestamp rules (without_timestamps, then sampled timestamps) text may come first: its
    first token was read as a timestamp, a start of -650 s; and unordered ones must not end before they start."""
    segments, _ = split((1318, 2068, TB + 250, TB + 260, 314, TB + 300), offset=330.0)
    assert segments == [(330.0, 335.0, 3), (335.2, 336.0, 3)]
    segments, _ = split((TB + 500, 7, TB + 100, TB + 100, 8, TB + 150))  # <|10.00|> x <|2.00|> …
    assert all(start <= end for start, end, _ in segments)
