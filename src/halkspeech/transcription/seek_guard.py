"""Speech the sequential seek rule would skip, and where the seek goes instead.

The reference's seek rule moves to the window's end when the window ends with a single timestamp (or with no
timestamp pair), and past a segment's end timestamp however far that runs. tiny.en on HE COULD WAIT NO LONGER,
1 s of silence and jfk.flac wrote `<|0.00|> He could wait no longer.<|2.00|>` and stopped: the seek went to
the window's end (the file's) and jfk's 11 s were never decoded (openai-whisper too). bench/lost_speech.py
lost 8 (tiny.en) and 6 (base) of its 208 cases; in all but one the window was one segment ending before (or
just into) the pause, then nothing (in the other, tiny.en wrote the second sentence at the first one's time).

So where the rule would skip speech the VAD heard, the seek stops there, with batched mode's judgement
(swallowed.py): over UNHEARD_MIN_S of speech between the last segment's end and where the rule moves
(`after_end`: the seek goes to where that speech begins); or a segment spanning a pause of SWALLOW_GAP_S and
the speech after it (`suspect`: the window from that speech on is decoded as a probe, and the segment is cut
at the pause only where the probe hears words the window did not say). Everything else is the reference's.

The guard looks only at windows after whose last segment the rule skips UNHEARD_MARGIN_S + UNHEARD_MIN_S of
audio or more (`skips`), and runs the VAD (silero, the whole file at once, lazily) at the first of them; files
without one never run it. Looking at every window for swallowed segments ran it on every file: on 2 CPU cores
3.9% (tiny.en) and 3.0% (base) of the dev set's short clips' time, 3.5% and 2.0% of the 52 s file's, 1.2% and
0.7% of the 8.6 min chapter's, and in bench/lost_speech.py's 208 cases it found no lost speech that the rule
after the last segment did not (its one probe kept a window whose text ran past its timestamps from being
written twice, in a window this rule looks at too). So a segment that swallows the speech after a pause is
caught only in a window the rule leaves 1.5 s early; where its end timestamp runs to the window's end, the
speech stays lost, as in the reference.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from halkspeech.audio.vad import SpeechDetector, VadOptions
from halkspeech.model.dims import TIME_PRECISION
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.segments import RawSegment
from halkspeech.transcription.swallowed import (
    SWALLOW_GAP_S,
    UNHEARD_MARGIN_S,
    UNHEARD_MIN_S,
    Heard,
    Suspect,
    find_suspect,
    hear,
    unheard,
)
from halkspeech.transcription.types import TranscribeOptions

#: Speech the VAD must hear inside a suspect segment before its pause. A window starts where the last one's
#: segments ended, often at the tail of a sentence: its first segment's start timestamp then sits there, in the
#: VAD's padding, over the pause before the next sentence, which it says (tiny.en: `<|10.20|> He could wait no
#: longer.<|13.20|>` with the speech before the pause ending at 10.21 s). Without this, 34 of bench/lost_speech.py's
#: 208 cases probed such a segment for nothing with tiny.en, and in one the probe, prompted with that sentence,
#: gave the sentence after the next pause at the pause's time, so it was cut and that sentence written twice.
SPOKEN_BEFORE_S = 0.5


def guarded(options: TranscribeOptions) -> bool:
    """Whether the guard applies: not under forced decoding (benchmarks: fixed lengths, as batched mode), nor
    without timestamps (a window is then one segment to its end; the rule skips nothing)."""
    forced = options.force_decode_tokens is not None or options.force_tokens_per_second is not None
    return not (forced or options.without_timestamps)


class SeekGuard:
    """The VAD's word on one file's windows before the seek loop moves past them."""

    def __init__(
        self,
        audio: np.ndarray,
        device: torch.device,
        vad: VadOptions = VadOptions(),
        detector: SpeechDetector | None = None,
    ) -> None:
        self.audio, self.device, self.vad = audio, device, vad
        self.detector = detector or SpeechDetector()  # cheap: the network is loaded once per device
        self._heard: Heard | None = None
        self.vad_ms = 0.0  # wall time of the VAD pass (0 when it never ran)

    async def heard(self) -> Heard:
        """The whole file's VAD, computed on the first call (in a worker thread: the event loop stays free)."""
        if self._heard is None:
            started = time.perf_counter()
            self._heard = await asyncio.to_thread(hear, self.audio, self.device, self.vad, self.detector)
            self.vad_ms = (time.perf_counter() - started) * 1000
        return self._heard

    @staticmethod
    def skips(raw: list[RawSegment], target: float) -> bool:
        """Whether the seek rule, moving to `target` (seconds), skips enough audio after the window's last
        segment to hold UNHEARD_MIN_S of speech: the only windows the guard looks at (and runs the VAD for)."""
        return bool(raw) and target - raw[-1].end >= UNHEARD_MARGIN_S + UNHEARD_MIN_S

    async def after_end(self, raw: list[RawSegment], target: float) -> float | None:
        """Where the speech the VAD heard between the last segment's end and `target` (where the seek rule
        moves, seconds) begins, when the rule would skip over UNHEARD_MIN_S of it. None: it skips none."""
        if not self.skips(raw, target):
            return None
        return unheard(await self.heard(), raw[-1].end, target)

    async def suspect(self, raw: list[RawSegment]) -> Suspect | None:
        """A segment whose span holds a pause and then speech the VAD heard (swallowed.find_suspect)."""
        if not any(r.end - r.start >= SWALLOW_GAP_S + UNHEARD_MIN_S for r in raw):
            return None  # no segment long enough to hold a pause and a second of speech
        heard = await self.heard()
        regions = heard.regions_in(raw[0].start, raw[-1].end)
        return find_suspect(raw, regions, heard.has_speech, UNHEARD_MIN_S, SPOKEN_BEFORE_S)


def text_before(tokenizer: Tokenizer, tokens: tuple[int, ...], offset: float, until: float) -> str:
    """A window's text (decoded from `offset`, seconds) up to its first timestamp at or past `until`: what a
    probe says for the audio the window it probes had already given segments to."""
    kept: list[int] = []
    for t in tokens:
        if t >= tokenizer.timestamp_begin:
            if offset + (t - tokenizer.timestamp_begin) * TIME_PRECISION >= until:
                break
        elif t < tokenizer.eot:
            kept.append(t)
    return tokenizer.decode(kept)
