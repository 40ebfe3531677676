"""faster-whisper's `vad_filter` in sequential mode: transcribe only the speech the VAD hears, joined end to
end, then put every time back on the file's timeline.

faster-whisper (1.2.1, `WhisperModel.transcribe(vad_filter=True)`) runs silero over the whole file
(`get_speech_timestamps`), joins the speech regions' samples (`collect_chunks`), transcribes the joined audio
as one file and maps each time back (`restore_speech_timestamps`, `SpeechTimestampsMap`). Here the same, with
HalkSpeech's VAD pass (swallowed.hear: silero batched over the file, quiet audio raised first, run off the
event loop on the model's device) and the normal SequentialTranscription over the joined audio, so every
option (language detection, prompts, hotwords, word timestamps, temperatures) applies unchanged. Whisper is
never shown long silence or music to invent text for, and a file that is mostly pauses has less to decode.

The time map: the joined audio is chunk 0's samples, then chunk 1's, ... A time t of it lies in the chunk
whose joined span holds it and maps to t plus the silence removed before that chunk. At a boundary (one
chunk's joined end is the next one's joined start) a start belongs to the later chunk and an end to the
earlier one, as faster-whisper's `is_end`. A word maps as a whole through the chunk of its midpoint
(faster-whisper 1.2.1's choice; older versions took its start), so it never straddles removed silence, and
its times are clamped into that chunk's span of the file (faster-whisper leaves a word that began in the
previous chunk's tail reaching back into the removed silence): every time then lies in audio that was
transcribed. A segment with words spans its first word's start to its last word's end (as there); one
without words maps its start and end on their own, so a segment that runs across a cut spans the silence.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from halkspeech.audio.vad import SpeechDetector, VadOptions
from halkspeech.model.dims import FRAMES_PER_SECOND, SAMPLE_RATE
from halkspeech.transcription.swallowed import hear
from halkspeech.transcription.types import Segment, Word

#: faster-whisper's vad_filter defaults (faster_whisper/vad.py `VadOptions`, 1.2.1: threshold 0.5,
#: neg_threshold None (threshold - 0.15), min_speech_duration_ms 0, min_silence_duration_ms 2000,
#: speech_pad_ms 400, max_speech_duration_s inf). HalkSpeech's speech_regions has the same hysteresis and
#: no maximum length. Pauses under 2 s stay inside a region, so a cut never lands between two words of a
#: sentence, and regions padded by 0.4 s each side never overlap (their gaps are ≥ 2 s before padding).
FILTER_VAD = VadOptions(threshold=0.5, neg_threshold=None, min_speech_s=0.0, min_silence_s=2.0, pad_s=0.4)


@dataclass(frozen=True)
class SpeechMap:
    """The speech kept from a file: chunk i is samples [spans[i][0], spans[i][1]) of it (sorted, disjoint,
    non-empty), and the joined audio is the chunks' samples end to end."""

    spans: tuple[tuple[int, int], ...]

    @classmethod
    def from_regions(cls, regions: list[tuple[float, float]], n_samples: int) -> SpeechMap:
        """Speech regions in seconds (speech_regions' output) → sample spans inside [0, n_samples)."""
        spans: list[tuple[int, int]] = []
        for start, end in regions:
            a = min(max(round(start * SAMPLE_RATE), 0), n_samples)
            b = min(max(round(end * SAMPLE_RATE), a), n_samples)
            if b > a:
                spans.append((a, b))
        return cls(tuple(spans))

    @cached_property
    def _joined_ends(self) -> list[float]:
        """Seconds: where each chunk ends in the joined audio (cumulative kept duration) [n_chunks]."""
        ends, total = [], 0
        for a, b in self.spans:
            total += b - a
            ends.append(total / SAMPLE_RATE)
        return ends

    @cached_property
    def _shifts(self) -> list[float]:
        """Seconds of audio removed before each chunk: joined time + shift = the file's time [n_chunks]."""
        starts = [0.0, *self._joined_ends[:-1]]
        return [a / SAMPLE_RATE - s for (a, _), s in zip(self.spans, starts, strict=True)]

    @property
    def kept_s(self) -> float:
        """Seconds of the joined audio."""
        return self._joined_ends[-1] if self.spans else 0.0

    def join(self, audio: np.ndarray) -> np.ndarray:
        """The chunks' samples end to end: [sum of span lengths] float32 (one copy)."""
        return np.concatenate([audio[a:b] for a, b in self.spans]) if self.spans else audio[:0]

    def chunk_at(self, t: float, *, end: bool = False) -> int:
        """The chunk a joined-audio time belongs to: at a boundary, an end's chunk is the earlier one."""
        find = bisect.bisect_left if end else bisect.bisect_right
        return min(find(self._joined_ends, t), len(self.spans) - 1)

    def original(self, t: float, chunk: int) -> float:
        """Joined-audio time t as a time of the file, inside chunk `chunk`'s span of it."""
        a, b = self.spans[chunk]
        return min(max(t + self._shifts[chunk], a / SAMPLE_RATE), b / SAMPLE_RATE)

    def time(self, t: float, *, end: bool = False) -> float:
        """Joined-audio time t → the file's time (through the chunk holding t)."""
        return self.original(t, self.chunk_at(t, end=end))

    def word(self, word: Word) -> Word:
        """A word's times on the file's timeline, both through the chunk of its midpoint."""
        chunk = self.chunk_at((word.start + word.end) / 2)
        return replace(word, start=self.original(word.start, chunk), end=self.original(word.end, chunk))

    def segment(self, segment: Segment) -> Segment:
        """A segment (times, words, and seek in 10 ms frames) on the file's timeline."""
        seek = round(self.time(segment.seek / FRAMES_PER_SECOND) * FRAMES_PER_SECOND)
        if segment.words:
            words = tuple(self.word(w) for w in segment.words)
            return replace(segment, seek=seek, start=words[0].start, end=words[-1].end, words=words)
        start, end = self.time(segment.start), self.time(segment.end, end=True)
        return replace(segment, seek=seek, start=start, end=max(end, start))


async def find_speech(audio: np.ndarray, device: torch.device, detector: SpeechDetector | None = None) -> SpeechMap:
    """The whole file's VAD with FILTER_VAD (in a worker thread: the event loop stays free) → its speech."""
    heard = await asyncio.to_thread(hear, audio, device, FILTER_VAD, detector or SpeechDetector())
    return SpeechMap.from_regions(heard.regions, len(audio))
