"""Sequential long-form transcription: seek through the audio one 30 s window at a time, each window
conditioned on the text before it (the reference implementation's `transcribe`, through the engine), except
that the seek does not skip speech the VAD heard after a pause (seek_guard.py).

Windows of one file run one after another, but many files (and requests) run at once and share every
engine step; batched.py is the mode that also parallelises within a file.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from halkspeech.audio.features import log_mel_spectrogram, pad_or_trim
from halkspeech.engine.factory import ModelEngine
from halkspeech.model.dims import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from halkspeech.transcription.alignment import TimedSpan, last_end, time_words
from halkspeech.transcription.seek_guard import SeekGuard, guarded, text_before
from halkspeech.transcription.segments import RawSegment, split_window
from halkspeech.transcription.swallowed import cut_at_pause, heard_anew
from halkspeech.transcription.types import Segment, Timings, TranscribeOptions, Transcript
from halkspeech.transcription.window import Progress, WindowDecoder, WindowResult

# -74 dBFS: above a digital zero and dither (a few 16-bit steps, 3e-5 each); far below speech, which Whisper's
# log-mel (normalised to the loudest part) hears even at -60 dBFS: a gate at 1e-3 dropped such speech whole.
SILENCE_PEAK = 2e-4

Verdict = Literal["new", "said"]  # a probe's (seek guard): new words heard, or all of them said already

__all__ = ["Progress", "SequentialTranscription", "WindowDecoder", "WindowResult"]


@dataclass(frozen=True)
class _Probe:
    """A window the seek guard decoded at `seek` with `prompt`: the loop's next window when both match."""

    seek: int
    prompt: list[int]
    window: WindowResult


class SequentialTranscription:
    """The seek loop over one file."""

    def __init__(
        self,
        model: ModelEngine,
        audio: np.ndarray,
        options: TranscribeOptions,
        progress: Progress | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.progress = progress
        self.on_segment = on_segment
        self.decoder = WindowDecoder(model, options)
        self.tokenizer = model.tokenizer
        self.audio = audio
        self.mel = torch.zeros(0, N_FRAMES)  # the whole file's log-mel [n_mels, frames]: made by run(), off the loop
        self.duration = len(audio) / SAMPLE_RATE  # as batched mode's (the mel frames round it down to 10 ms)
        self.language = self.decoder.language()
        self.guard = SeekGuard(audio, model.device) if guarded(options) else None

    @property
    def content_frames(self) -> int:
        """Mel frames of the audio itself (without the 30 s of silence appended); 0 before run()."""
        return self.mel.shape[-1] - N_FRAMES

    def _silent(self, seek: int, size: int) -> bool:
        """The window's audio never reaches -74 dBFS: digital silence or dither. Whisper would decode it to an
        invented word (" you", as openai-whisper does on 20 s of silence); skip it undecoded."""
        samples = self.audio[seek * HOP_LENGTH : (seek + size) * HOP_LENGTH]
        return samples.size == 0 or float(np.abs(samples).max()) < SILENCE_PEAK

    def _window(self, seek: int) -> tuple[torch.Tensor, int]:
        size = min(N_FRAMES, self.content_frames - seek)
        return pad_or_trim(self.mel[:, seek : seek + size], N_FRAMES), size

    def _report(self, seek: int) -> None:
        """Tell the progress callback how many seconds of audio are done."""
        if self.progress:
            done = self.duration if seek >= self.content_frames else seek * HOP_LENGTH / SAMPLE_RATE
            self.progress(done, self.duration)

    async def run(self) -> Transcript:
        started = time.perf_counter()
        # Whole-file log-mel with 30 s of silence appended, normalised over the whole file (as the reference). On
        # a worker thread, as batched mode's: on a CPU it is ~10 ms a window, which on the event loop held up
        # every connection (60% of the loop's time with 100 live users on tiny.en, py-spy). On a GPU too:
        # launched from the loop (session 37, the samples through pinned memory) it took the server at 256
        # clients from 0.82 to 0.53-0.56 of the engine's throughput on an H100 (bench/NOTES.md, session 38).
        self.mel = await asyncio.to_thread(
            log_mel_spectrogram, self.audio, self.model.dims.n_mels, padding=N_SAMPLES, device=self.model.device
        )
        o, tok = self.options, self.tokenizer
        initial = tok.encode_prompt(o.initial_prompt) if o.initial_prompt else []
        all_tokens: list[int] = list(initial)
        segments: list[Segment] = []
        prompt_reset = 0
        language_probs = None
        last_speech = 0.0  # end of the last word so far (word timings' pause heuristics)
        seek = 0
        probe: _Probe | None = None  # the next window, when the seek guard decoded it already
        while seek < self.content_frames:
            mel, size = self._window(seek)
            if self._silent(seek, size):
                seek += size
                self._report(seek)
                continue
            detect = self.language is None
            if detect and size < N_FRAMES:
                # As the reference: detected from the whole file's log-mel, where the 30 s of silence appended to
                # the audio fill the window. The decode window is padded in the log-mel domain instead; from it,
                # clips under 30 s got other probabilities, and on a 1 s clip another language.
                full = self.mel[:, seek : seek + N_FRAMES]
                self.language, language_probs = await self.decoder.detect_language(full)
                detect = False
            prompt = all_tokens[prompt_reset:]
            if probe is not None and (probe.seek, probe.prompt) == (seek, prompt) and not detect:
                window = probe.window
            else:
                window = await self.decoder.decode(mel, self.language, prompt, detect=detect)
            probe = None
            if detect:
                language_probs = window.language_probs
                self.language = window.language or "en"
            previous_seek = seek
            if self.decoder.is_silence(window):
                seek += size
            else:
                time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
                tokens = window.result.tokens
                raw, advance = split_window(
                    tokens, timestamp_begin=tok.timestamp_begin, time_offset=time_offset, segment_frames=size
                )
                seek += advance
                rule_seek = seek
                if self.guard is not None:
                    raw, seek, probe = await self._guard(raw, window, previous_seek, seek, all_tokens, prompt_reset)
                timed = self._words(raw, window, size, time_offset, last_speech) if o.word_timestamps else None
                if timed is not None:
                    last_speech = last_end(timed) or last_speech
                    if self._unfinished(tokens) and last_speech > time_offset and seek == rule_seek:
                        seek = round(last_speech * FRAMES_PER_SECOND)  # the reference: resume after the last word
                for i, piece in enumerate(raw):
                    segment = self._segment(len(segments), previous_seek, piece, window, timed[i] if timed else None)
                    segments.append(segment)
                    all_tokens.extend(segment.tokens)
                    if self.on_segment and segment.text:
                        self.on_segment(segment)
                if not o.condition_on_previous_text or window.result.temperature > 0.5:
                    prompt_reset = len(all_tokens)
            self._report(seek)
        return self._transcript(segments, all_tokens[len(initial) :], language_probs, started)

    def _unfinished(self, tokens: tuple[int, ...]) -> bool:
        """Whether the window's last segment may run on past it (no single timestamp ends the window), where
        word timings resume at its last word (the reference's rule). Not without timestamps: no timestamp ever
        ends such a window, which is one segment taken whole (split_window), yet openai-whisper and
        faster-whisper resume there too, and decode the rest again: tiny.en added " Thank you. Thank you. Yeah.
        Yeah." to jfk.flac from its last 0.5 s, base repeated a whole 16 s sentence; word timings must not change
        the text."""
        if self.options.without_timestamps:
            return False
        return [t >= self.tokenizer.timestamp_begin for t in tokens[-2:]] != [False, True]

    async def _guard(
        self,
        raw: list[RawSegment],
        window: WindowResult,
        start: int,
        seek: int,
        all_tokens: list[int],
        prompt_reset: int,
    ) -> tuple[list[RawSegment], int, _Probe | None]:
        """The window's segments and the next seek (frames) as the seek rule gave them, unless it skips speech
        the VAD heard (seek_guard.py): a segment that swallowed a pause and the speech after it ends at the
        pause, and the seek goes to that speech (the probe decoded from it is the next window); or the seek
        goes to speech heard after the last segment, which the rule would have moved past."""
        assert self.guard is not None
        if not self.guard.skips(raw, seek / FRAMES_PER_SECOND):
            return raw, seek, None  # the rule skips too little after the last segment: no VAD (seek_guard.py)
        suspect = await self.guard.suspect(raw)
        resume = round(suspect.resume * FRAMES_PER_SECOND) if suspect else 0
        if suspect is not None and start < resume < seek:
            kept = cut_at_pause(raw, suspect)
            probe = await self._probe(resume, self._prompt_after(kept, window, all_tokens, prompt_reset))
            verdict = self._verdict(raw[suspect.index :], probe, suspect.resume, raw[-1].end)
            if verdict == "new":
                return kept, resume, probe
            if verdict == "said":
                return raw, seek, None
        after = await self.guard.after_end(raw, seek / FRAMES_PER_SECOND)
        if after is not None and start < round(after * FRAMES_PER_SECOND) < seek:
            return raw, round(after * FRAMES_PER_SECOND), None
        return raw, seek, None

    def _verdict(self, tail: list[RawSegment], probe: _Probe, at: float, until: float) -> Verdict | None:
        """The probe (decoded from `at`) against the window's segments from the suspect on (`tail`, to `until`):
        "new" when it heard other words for their audio (swallowed.heard_anew); "said" when the window said all
        it heard, to its end: the window's text ran past its timestamps (tiny.en wrote a sentence spoken at
        5-11 s at 0-7 s), and decoding the speech after its last segment again would write it twice."""
        if self.decoder.is_silence(probe.window):
            return None
        tok, tokens = self.tokenizer, probe.window.result.tokens
        said = "".join(r.text(tok) for r in tail)
        if heard_anew(tok, said, text_before(tok, tokens, at, until)):
            return "new"
        return None if heard_anew(tok, said, text_before(tok, tokens, at, math.inf)) else "said"

    def _prompt_after(
        self, kept: list[RawSegment], window: WindowResult, all_tokens: list[int], prompt_reset: int
    ) -> list[int]:
        """The prompt the loop gives the window after this one when it keeps `kept` (as run() extends it)."""
        tokens = all_tokens + [t for r in kept for t in self._segment(0, 0, r, window).tokens]
        if not self.options.condition_on_previous_text or window.result.temperature > 0.5:
            return []
        return tokens[prompt_reset:]

    async def _probe(self, seek: int, prompt: list[int]) -> _Probe:
        mel, _ = self._window(seek)
        return _Probe(seek, prompt, await self.decoder.decode(mel, self.language, prompt))

    def _words(
        self, raw: list[RawSegment], window: WindowResult, size: int, time_offset: float, last_speech: float
    ) -> list[TimedSpan] | None:
        """Word timings for the window's kept segments (None when the engine returned no alignment)."""
        alignment = window.result.alignment
        if alignment is None or not raw:
            return None
        eot = self.tokenizer.eot
        spans = [(r.start, r.end, sum(t < eot for t in r.tokens)) for r in raw]
        timed, _ = time_words(
            alignment,
            self.tokenizer,
            self.language,
            spans,
            num_frames=size,
            time_offset=time_offset,
            last_speech=last_speech,
        )
        return timed

    def _segment(
        self, index: int, seek: int, raw: RawSegment, window: WindowResult, timed: TimedSpan | None = None
    ) -> Segment:
        text = raw.text(self.tokenizer)
        start, end = (timed.start, timed.end) if timed else (raw.start, raw.end)
        hi = self.duration
        # Text that starts where the audio has ended was written over the last window's padding, with no audio
        # under it (3 minutes of tones ended in " 1.5%" twice at 180.0-180.0 s: stacked 1 ms subtitles). A
        # timestamp in the padding that ends a segment means the audio's end: openai-whisper leaves it, so a
        # segment (or word) could end up to a second after the file does; subtitles should not.
        empty = start == end or start >= hi or not text.strip()
        start = min(start, hi)
        end = min(max(end, start), hi)
        words = None if timed is None else (() if empty else tuple(w.clamped(0.0, hi) for w in timed.words))
        return Segment(
            id=index,
            seek=seek,
            start=start,
            end=end,
            text="" if empty else text,
            tokens=() if empty else raw.tokens,
            temperature=window.result.temperature,
            avg_logprob=window.result.avg_logprob,
            compression_ratio=window.compression_ratio,
            no_speech_prob=window.result.no_speech_prob,
            words=words,
        )

    def _transcript(
        self,
        segments: list[Segment],
        tokens: list[int],
        language_probs: dict[str, float] | None,
        started: float,
    ) -> Transcript:
        t = self.decoder.timer
        return Transcript(
            text=self.tokenizer.decode(tokens),
            language=self.language or "en",
            duration=self.duration,
            segments=tuple(s for s in segments if s.text),
            language_probs=language_probs,
            timings=Timings(
                t.queue,
                t.encoder,
                t.decoder,
                (time.perf_counter() - started) * 1000,
                vad=self.guard.vad_ms if self.guard else 0.0,
            ),
            tokens=tuple(tokens),
        )
