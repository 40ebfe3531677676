"""Hallucination guards for single segments: Whisper's failure mode on hard audio is a phrase repeated
until the window ends ("Thank you. Thank you. Thank you. …"). The window-level compression-ratio guard misses
it when the loop is short and the rest of the window is fine, so each segment is checked on its own."""

from __future__ import annotations

import re
from itertools import pairwise

from halkspeech.model.languages import language_key
from halkspeech.transcription.segments import compression_ratio

_WORD = re.compile(r"\w+(?:'\w+)?")


def longest_repeat(words: list[str], max_n: int = 8) -> tuple[int, int]:
    """The most consecutive repeats of any n-gram (n ≤ max_n) in `words`: (n, times), e.g. "a b a b a b"
    → (2, 3). (1, 1) when nothing repeats."""
    best = (1, 1 if words else 0)
    for n in range(1, max_n + 1):
        for start in range(n):  # n-grams aligned at start, start + n, …
            grams = [tuple(words[i : i + n]) for i in range(start, len(words) - n + 1, n)]
            run = 1
            for previous, current in pairwise(grams):
                run = run + 1 if current == previous else 1
                if run > best[1] or (run == best[1] and n < best[0]):
                    best = (n, run)
    return best


def is_repetitive(
    text: str, *, min_repeats: int = 4, min_repeated_words: int = 8, compression_threshold: float | None = 2.4
) -> bool:
    """True when the segment looks like a repetition loop: an n-gram repeated at least `min_repeats` times in
    a row covering at least `min_repeated_words` words (so "no, no, no" passes), or, for text long enough to
    judge (≥ 100 bytes), a compression ratio above the threshold."""
    words = [language_key(w) for w in _WORD.findall(text)]  # "İYİ" and "iyi" are one word, as YES and yes
    n, times = longest_repeat(words)
    if times >= min_repeats and n * times >= min_repeated_words:
        return True
    data_len = len(text.encode("utf-8"))
    return compression_threshold is not None and data_len >= 100 and compression_ratio(text) > compression_threshold
