"""Chunks finish in any order; the transcript and its listeners see them in order.

`Stitcher.finish(i, segments)` holds chunk i's segments until chunks 0 … i-1 are done, then releases them
numbered, with times made monotonic (a segment never starts before the previous one ended, a word never
before the previous word), and reports progress for every finished chunk at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from halkspeech.transcription.types import Segment, Word
from halkspeech.transcription.window import Progress


@dataclass
class Stitcher:
    shares: list[float]  # seconds of the file each chunk accounts for (they sum to the duration)
    duration: float
    progress: Progress | None = None
    on_segment: Callable[[Segment], None] | None = None
    segments: list[Segment] = field(default_factory=list)  # released so far, in order
    _held: dict[int, list[Segment]] = field(default_factory=dict)
    _next: int = 0
    _seconds: float = 0.0
    _end: float = 0.0  # end of the last released segment
    _word_end: float = 0.0  # end of the last released word

    def finish(self, index: int, segments: list[Segment]) -> None:
        """Chunk `index` is done (its segments in order, absolute times)."""
        self._held[index] = segments
        self._seconds += self.shares[index]
        while self._next in self._held:
            for segment in self._held.pop(self._next):
                self._release(segment)
            self._next += 1
        if self.progress:
            self.progress(min(self._seconds, self.duration), self.duration)

    @property
    def complete(self) -> bool:
        return self._next == len(self.shares)

    def _release(self, segment: Segment) -> None:
        start = max(segment.start, self._end)
        end = max(segment.end, start)
        words = None if segment.words is None else tuple(self._word(w) for w in segment.words)
        segment = replace(segment, id=len(self.segments), start=start, end=end, words=words)
        self._end = end
        self.segments.append(segment)
        if self.on_segment:
            self.on_segment(segment)

    def _word(self, word: Word) -> Word:
        start = max(word.start, self._word_end)
        end = max(word.end, start)
        self._word_end = end
        return replace(word, start=start, end=end)
