"""Live turns on the real tiny.en engine: finals equal file transcription, partials' stable text only grows,
pauses cut segments, limits hold, and a closed session leaves no engine work behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import TEST_DATA, pcm16
from halkspeech.api.jobs import check_options
from halkspeech.audio import decode_audio, decode_pcm16
from halkspeech.audio.streaming import PCMStream, StreamingVAD, VADStream
from halkspeech.engine.factory import ModelEngine
from halkspeech.errors import AudioDecodeError, AudioTooLong, InvalidRequest, Overloaded
from halkspeech.transcription import streaming
from halkspeech.transcription.live import (
    AGREE_SPAN_S,
    Final,
    LiveEvent,
    Partial,
    Piece,
    Segmenter,
    SegmentReady,
    SpeechStarted,
    SpeechStopped,
    StablePrefix,
    StreamError,
    StreamLimits,
    StreamOptions,
    TurnStarted,
)
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.streaming import (
    OFF_LOOP_BYTES,
    PARTIAL_PRIORITY,
    PIN_LANGUAGE_S,
    LiveSession,
    LiveTurn,
    NoTurn,
    TurnActive,
    _transcribe_options,
)
from halkspeech.transcription.types import TranscribeOptions

FRAME_BYTES = 640  # 20 ms of 16-bit mono at 16 kHz


def frames(data: bytes, size: int = FRAME_BYTES) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Recorder:
    """Collects a session's events; `wait_for` blocks until one of a kind arrives."""

    def __init__(self) -> None:
        self.events: list[LiveEvent] = []
        self._arrived = asyncio.Event()

    async def emit(self, event: LiveEvent) -> None:
        self.events.append(event)
        self._arrived.set()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, kind: type, count: int = 1, timeout: float = 60.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), max(0.01, deadline - time.monotonic()))
        return self.of(kind)


def session_for(model: ModelEngine, limits: StreamLimits = StreamLimits(), vad: StreamingVAD | None = None, **kw: Any):
    recorder = Recorder()

    @contextlib.asynccontextmanager
    async def models(name: str | None) -> AsyncIterator[ModelEngine]:
        yield model

    return LiveSession(models, limits, recorder.emit, vad, **kw), recorder


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


@pytest.fixture(scope="module")
def jfk_audio(jfk_path: Path) -> np.ndarray:
    return decode_audio(jfk_path)


@pytest.fixture(scope="module")
def vad() -> StreamingVAD:
    detector = StreamingVAD()
    yield detector
    detector.close()


# -- pure pieces ------------------------------------------------------------------------------------------


def test_stable_prefix_of_text_without_spaces_grows_by_characters() -> None:
    """Japanese has no spaces to split words at: the stable text stayed empty for a whole turn."""
    prefix = StablePrefix()
    stables = [prefix.update(h, "ja")[1] for h in ("客観的実在の", "客観的実在の判断的", "客観的実在の判断的知識が")]
    assert stables == ["", "客観的実在の", "客観的実在の判断的"]
    turkish = StablePrefix()
    assert [turkish.update(h, "tr")[1] for h in ("BUGÜN İYİ", "bugün iyi hava")] == ["", "bugün iyi"]


def test_a_revision_that_splits_or_joins_a_committed_word_repeats_and_drops_nothing() -> None:
    split = StablePrefix()
    for hypothesis in ("And so my fellow", "And so my fellow Americans"):
        split.update(hypothesis)
    assert split.stable == ["And", "so", "my", "fellow"]
    assert split.update("And so my fel low Americans ask")[0] == "And so my fellow Americans ask"  # not "… low …"
    joined = StablePrefix()
    for hypothesis in ("any more of", "any more of this"):
        joined.update(hypothesis)
    assert joined.stable == ["any", "more", "of"]
    assert joined.update("anymore of this is")[0] == "any more of this is"  # not "any more of is"


def test_a_revision_that_joins_the_last_committed_word_to_the_next_grows_it_in_place() -> None:
    """tiny.en's partials of a dev clip: "flower" was committed, then the hypothesis said "flower-fattened". Cut
    before that word, the text read "flower flower-fattened"; cut after it, "-fattened" was lost."""
    prefix = StablePrefix()
    for hypothesis in ("and thick peppered flower fat.", "and thick peppered flower fattens."):
        prefix.update(hypothesis)
    assert prefix.stable[-1] == "flower"
    text, stable = prefix.update("and thick peppered flower-fattened sauce.")
    assert text == "and thick peppered flower-fattened sauce."
    assert stable == "and thick peppered flower-fattened"  # grown in place: the stable text only grows
    assert prefix.update("and thick peppered flower-fattened sauce.")[1] == stable
    the = StablePrefix()  # a next word that merely starts with the committed one's letters is not glued
    for hypothesis in ("in the", "in the", "in the theory"):
        text, _ = the.update(hypothesis)
    assert text == "in the theory"


def test_words_are_committed_once_hypotheses_over_0_8_s_of_audio_agree() -> None:
    """base's partials of a dev clip: "How do you marry" from 1.4 and 1.8 s of audio agreed, was committed and
    streamed, and the final's "Had he married a" could not take it back. A word now needs every hypothesis of
    the last AGREE_SPAN_S (0.8 s) of audio growth: three partials 0.4 s apart, or two 0.8 s apart."""
    assert AGREE_SPAN_S == 0.8
    hypotheses = ["How do you", "How do you marry", "Had he married a more", "Had he married a more amiable"]
    hypotheses.append("Had he married a more amiable woman")
    close = StablePrefix()
    stables = [close.update(h, "en", 1.0 + 0.4 * i)[1] for i, h in enumerate(hypotheses)]
    assert stables == ["", "", "", "", "Had he married a more"]  # 1.0 and 1.4 s agreed on "How do you", 1.8 s not
    apart = StablePrefix()
    assert [apart.update(h, "en", 1.0 + 0.8 * i)[1] for i, h in enumerate(hypotheses[:2])] == ["", "How do you"]
    untimed = StablePrefix()  # without audio times: the previous hypothesis (LocalAgreement-2)
    assert [untimed.update(h)[1] for h in hypotheses[:2]] == ["", "How do you"]


def test_stable_prefix_only_grows_and_prefixes_text() -> None:
    prefix = StablePrefix()
    hypotheses = [
        "And so",
        "And so my fellow",
        "And so, my fellow Americans",
        "And also my fellow Americans ask",  # revises a committed word: the committed one stays
        "And so my fellow Americans ask not what",
    ]
    stables = []
    for hypothesis in hypotheses:
        text, stable = prefix.update(hypothesis)
        assert text.startswith(stable)
        stables.append(stable)
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(stables))
    assert stables[1] == "And so"
    assert stables[2] == "And so my fellow"  # hypotheses 2 and 3 agree (punctuation aside); "Americans" is held back
    assert stables[3] == "And so my fellow Americans"  # "also" revised a committed word: ours stays
    assert stables[-1].startswith("And so my fellow Americans")


def test_segmenter_reports_speech_and_pause_with_hysteresis() -> None:
    segmenter = Segmenter(pause_frames=3)
    probs = np.array([0.1, 0.9, 0.4, 0.8, 0.2, 0.2, 0.1, 0.1, 0.6])  # 0.4 ≥ 0.35 keeps speech going
    events = segmenter.push(probs)
    assert [(e.kind, e.sample) for e in events] == [("speech", 512), ("pause", 4 * 512), ("speech", 8 * 512)]


def test_options_refuse_bad_values() -> None:
    with pytest.raises(InvalidRequest, match="sample_rate"):
        StreamOptions(sample_rate=1000)
    with pytest.raises(InvalidRequest, match="segment_silence_ms"):
        StreamOptions(segment_silence_ms=5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # silero's own loader, the reference
def test_streaming_vad_matches_silero_frame_by_frame(vad: StreamingVAD, jfk_audio: np.ndarray) -> None:
    """Batched across streams and fed in uneven pieces, each stream's probabilities equal silero's own
    stateful wrapper run one frame at a time."""
    frames_ = jfk_audio[: len(jfk_audio) // 512 * 512].reshape(-1, 512)
    reference: list[float] = []

    def silero() -> None:  # in a thread: importing silero_vad sets the importing thread's torch threads to 1
        from silero_vad import load_silero_vad

        model = load_silero_vad()
        reference.extend(float(model(torch.from_numpy(f.copy()), 16_000).detach()) for f in frames_)

    thread = threading.Thread(target=silero)
    thread.start()
    thread.join()

    async def main() -> list[np.ndarray]:
        streams = [VADStream(), VADStream()]
        out: list[list[np.ndarray]] = [[], []]
        i = 0
        while i < len(frames_):
            k = 1 + i % 3  # 1, 2 or 3 frames per call; the second stream lags one piece behind
            results = await asyncio.gather(*(vad.probabilities(s, frames_[i : i + k]) for s in streams))
            for o, r in zip(out, results, strict=True):
                o.append(r)
            i += k
        return [np.concatenate(o) for o in out]

    for probs in asyncio.run(main()):
        np.testing.assert_allclose(probs, reference, atol=1e-5)
    assert max(reference) > 0.9 and min(reference) < 0.2  # speech and pauses both present


def test_a_long_vad_call_runs_in_jobs_and_holds_up_no_other_stream(vad: StreamingVAD, jfk_audio: np.ndarray) -> None:
    """One call with a minute of frames (a client's single huge WebSocket frame) runs as 1 s jobs: another
    stream's frame is answered between them, not after the minute, and the result equals frame-by-frame."""
    one = jfk_audio[: len(jfk_audio) // 512 * 512].reshape(-1, 512)
    minute = np.concatenate([one] * 6)  # 2,058 frames, 66 s

    async def main() -> tuple[np.ndarray, np.ndarray, float, float]:
        began = time.monotonic()
        whole = asyncio.create_task(vad.probabilities(VADStream(), minute))
        await asyncio.sleep(0.05)
        await vad.probabilities(VADStream(), one[:1])
        other = time.monotonic() - began
        result = await whole
        total = time.monotonic() - began
        stream = VADStream()
        framewise = np.concatenate([await vad.probabilities(stream, f[None]) for f in minute[:200]])
        return result, framewise, other, total

    result, framewise, other, total = asyncio.run(main())
    assert result.shape == (len(minute),)
    np.testing.assert_allclose(result[:200], framewise, atol=1e-5)
    assert other < total / 4, (other, total)


def test_pcm_stream_resamples_across_chunks(jfk_audio: np.ndarray) -> None:
    audio = jfk_audio[:32_000]  # 2 s
    at_8k = pcm16(audio[::2])  # 8 kHz PCM (crude decimation is fine for a length and shape check)
    stream = PCMStream(8_000)
    pieces = [stream.push(chunk) for chunk in frames(at_8k, 322)]  # odd sample counts per chunk
    held = stream.held  # what the resampler holds back until the end: the flush gives it
    out = np.concatenate([*pieces, stream.flush()])
    assert 0 < held == len(out) - sum(len(p) for p in pieces) and stream.held == 0
    assert abs(len(out) - 32_000) <= 16
    whole = decode_pcm16(at_8k, sample_rate=8_000)
    n = min(len(out), len(whole))
    assert np.corrcoef(out[:n].astype(np.float32), whole[:n])[0, 1] > 0.99  # no clicks at chunk edges
    with pytest.raises(AudioDecodeError, match="sample_rate"):
        PCMStream(4_000)


# -- turns on the real model ------------------------------------------------------------------------------


def test_final_equals_file_transcription(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    async def main() -> None:
        expected = await Transcriber(tiny_en_engine).transcribe(jfk_audio, TranscribeOptions())
        session, recorder = session_for(tiny_en_engine)
        await session.start(StreamOptions())
        for chunk in frames(pcm16(jfk_audio)):
            await session.feed(chunk)
        session.end()
        (final,) = await recorder.wait_for(Final)
        assert isinstance(recorder.events[0], TurnStarted)
        assert final.text == expected.text.strip()
        assert "ask not what your country can do for you" in final.text.lower()
        assert final.duration == pytest.approx(11.0, abs=0.02)
        assert final.as_message()["segments"][-1]["end"] <= 11.0
        await session.close()

    run(main)


@pytest.mark.parametrize("segments", [False, True], ids=["no-vad", "vad-segments"])
def test_a_long_message_is_resampled_off_the_event_loop_and_kept_if_its_reader_is_cancelled(
    tiny_en_engine: ModelEngine,
    vad: StreamingVAD,
    jfk_audio: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    segments: bool,
) -> None:
    """11 s of 24 kHz PCM in one message (516 KiB, over OFF_LOOP_BYTES) is resampled (and cut into VAD frames)
    on a worker thread and gives the final the event loop gives the same message (and, without the VAD, the
    same audio in 20 ms frames: the VAD's gain follows the loudest audio so far, so framing changes its input);
    a reader cancelled mid-message (the client left, the server stops) still leaves the whole message in the
    turn."""
    at_24k = pcm16(np.interp(np.arange(len(jfk_audio) * 3 // 2) / 1.5, np.arange(len(jfk_audio)), jfk_audio))
    assert len(at_24k) > OFF_LOOP_BYTES
    threads: list[str] = []
    push = PCMStream.push

    def recorded(stream: PCMStream, data: bytes) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return push(stream, data)

    monkeypatch.setattr(PCMStream, "push", recorded)
    main_thread = threading.main_thread().name

    async def final_of(messages: list[bytes], cancel_reader: bool = False) -> Final:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(sample_rate=24_000, segment_silence_ms=500 if segments else None))
        threads.clear()
        for message in messages:
            reader = asyncio.ensure_future(session.feed(message))
            if cancel_reader:
                await asyncio.sleep(0)  # the message is with the worker
                reader.cancel()
                await asyncio.wait([reader])
                assert reader.cancelled()
            else:
                await reader
        if not cancel_reader:  # the pauses the VAD hears cut segments (none are cut once the turn has ended)
            await session.turn.heard_all()
        await session.end_all()  # the final (as when the server winds a connection down)
        (final,) = await recorder.wait_for(Final)
        await session.close()
        return final

    def cuts(final: Final) -> list[tuple[float, float]]:
        return [(p.start, p.end) for p in final.pieces]

    async def main() -> None:
        whole = await final_of([at_24k])
        assert len(threads) == 1 and threads[0] != main_thread
        assert "your country can do for you" in whole.text.lower()
        assert len(whole.pieces) > 1 if segments else len(whole.pieces) == 1  # cut at its pauses
        with monkeypatch.context() as patch:
            patch.setattr(streaming, "OFF_LOOP_BYTES", len(at_24k))
            on_loop = await final_of([at_24k])
        assert threads == [main_thread]
        assert (on_loop.text, on_loop.duration, cuts(on_loop)) == (whole.text, whole.duration, cuts(whole))
        if not segments:
            framed = await final_of(frames(at_24k, 960))
            assert set(threads) == {main_thread}
            assert framed.text == whole.text and framed.duration == pytest.approx(whole.duration, abs=0.002)
        cancelled = await final_of([at_24k], cancel_reader=True)
        assert cancelled.duration == whole.duration and "for your country" in cancelled.text.lower()

    run(main)


def test_partials_stable_text_only_grows(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    """1.5 s at a time, each time waiting for the partial it triggers (no wall-clock dependence)."""

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine)
        await session.start(StreamOptions(partials=True))
        chunks = frames(pcm16(jfk_audio), 48_000)  # 1.5 s
        for i, chunk in enumerate(chunks):
            await session.feed(chunk)
            await recorder.wait_for(Partial, count=i + 1)  # the partial this chunk started
        session.end()
        await recorder.wait_for(Final)
        partials = recorder.of(Partial)
        assert len(partials) >= 6
        for earlier, later in itertools.pairwise(partials):
            assert later.stable_text.startswith(earlier.stable_text)
        for i, p in enumerate(partials):
            assert all(q.text.startswith(p.stable_text) for q in partials[i:])
        assert len(partials[-1].stable_text.split()) >= 8
        assert "americans" in partials[-1].stable_text.lower()
        assert recorder.events[-1] == recorder.of(Final)[0]  # nothing after the final
        await session.close()

    run(main)


def test_partials_keep_the_language_one_detected_and_the_final_detects_its_own(
    base_engine: ModelEngine, jfk_audio: np.ndarray
) -> None:
    """Without a language, partials detect it until one is sure from ≥ 3 s of audio; later partials decode in
    it without detecting again. The final still detects from the whole turn, as file transcription does."""
    calls: list[tuple[int, str | None, float]] = []  # (priority, language asked for, seconds of audio)

    async def main() -> None:
        session, recorder = session_for(base_engine)
        await session.start(StreamOptions(partials=True))
        transcribe = session.turn.transcriber.transcribe

        async def recording(audio: np.ndarray, options: TranscribeOptions) -> Any:
            calls.append((options.priority, options.language, len(audio) / 16_000))
            return await transcribe(audio, options)

        session.turn.transcriber.transcribe = recording  # type: ignore[method-assign]
        for i, chunk in enumerate(frames(pcm16(jfk_audio), 32_000)):  # 1 s at a time, each partial awaited
            await session.feed(chunk)
            await recorder.wait_for(Partial, count=i + 1)
        session.end()
        (final,) = await recorder.wait_for(Final)
        assert final.language == "en" and "ask not what your country" in final.text.lower()
        await session.close()

    run(main)
    partials = [(language, seconds) for priority, language, seconds in calls if priority == PARTIAL_PRIORITY]
    finals = [language for priority, language, _ in calls if priority != PARTIAL_PRIORITY]
    detected = [seconds for language, seconds in partials if language is None]
    assert detected[0] < PIN_LANGUAGE_S <= detected[-1]  # short partials detected each time, then one at 3 s
    pinned = partials[len(detected) :]
    assert len(pinned) >= 5 and {language for language, _ in pinned} == {"en"}
    assert finals == [None]


def test_a_partial_keeps_the_speech_after_a_pause(tiny_en_engine: ModelEngine, dev_clips: list[dict[str, Any]]) -> None:
    """Two LibriSpeech sentences with 1 s of silence between them, 24 s in all: decoded without timestamps, the
    partial stopped after the first sentence (end of text at the pause) and never showed the second, 10 s of
    speech, until the final did. With timestamps, as the final decodes, the window goes on after the pause."""
    clips = {c["id"]: c["path"] for c in dev_clips}
    first = decode_audio(clips["ls_1221-135766-0001_triton"])  # GOD AS A DIRECT CONSEQUENCE … SOUL IN HEAVEN
    second = decode_audio(clips["ls_1089-134686-0000"])  # HE HOPED THERE WOULD BE STEW FOR DINNER …
    audio = np.concatenate([first, np.zeros(16_000, np.float32), second])[: 24 * 16_000]

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine)
        await session.start(StreamOptions(language="en", partials=True))
        await session.feed(pcm16(audio))  # one frame: one partial of all 24 s
        (partial,) = await recorder.wait_for(Partial)
        assert "blessed soul in heaven" in partial.text.lower()
        assert "stew for dinner" in partial.text.lower()
        await session.close()

    run(main)


def test_pause_cuts_a_segment_before_end(tiny_en_engine: ModelEngine, vad: StreamingVAD) -> None:
    first = decode_audio(TEST_DATA / "1089-134691-0000.flac")  # HE COULD WAIT NO LONGER
    second = decode_audio(TEST_DATA / "LJ001-0002.wav")  # in being comparatively modern.

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(segment_silence_ms=700))
        for chunk in frames(pcm16(np.concatenate([first, np.zeros(24_000, np.float32)]))):  # + 1.5 s silence
            await session.feed(chunk)
            await asyncio.sleep(0)  # let the VAD task keep up, as with a real client
        (segment,) = await recorder.wait_for(SegmentReady)  # before `end`: cut at the pause
        assert "wait no longer" in segment.piece.text.lower()
        assert segment.piece.end < len(first) / 16_000 + 0.75
        for chunk in frames(pcm16(second)):
            await session.feed(chunk)
        session.end()
        (final,) = await recorder.wait_for(Final)
        assert "wait no longer" in final.text.lower() and "comparatively modern" in final.text.lower()
        assert final.text.startswith(segment.piece.text)
        starts = [s["start"] for s in final.as_message()["segments"]]
        assert starts == sorted(starts) and starts[-1] > len(first) / 16_000 + 1.0  # times from the turn start
        await session.close()

    run(main)


@pytest.mark.parametrize("then_more", [False, True])
def test_too_little_speech_to_hear_is_not_transcribed(
    tiny_en_engine: ModelEngine, vad: StreamingVAD, jfk_audio: np.ndarray, then_more: bool
) -> None:
    """jfk.flac ends in three frames (96 ms) the VAD takes for speech, after a pause that cuts the last sentence.
    Transcribed alone, those 0.26 s (with the preroll) read "Thank you." They are shorter than
    StreamLimits.min_speech_s, so neither the rest at the end nor a segment cut at the next pause is transcribed:
    the segment goes out with no text, and the final holds only what was said."""
    second = decode_audio(TEST_DATA / "LJ001-0002.wav")  # in being comparatively modern.
    tail = [np.zeros(16_000, np.float32), second, np.zeros(16_000, np.float32)] if then_more else []

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(language="en", segment_silence_ms=300))
        for chunk in frames(pcm16(np.concatenate([jfk_audio, *tail]))):
            await session.feed(chunk)
            await asyncio.sleep(0)
        await session.turn.heard_all()
        session.end()
        (final,) = await recorder.wait_for(Final)
        await session.close()
        segments = [s.piece for s in recorder.of(SegmentReady)]
        assert [p.text for p in final.pieces] == [p.text for p in segments]  # no rest after the last segment
        blip = [p for p in segments if p.start > 10.5 and p.end < 12.0]
        assert [p.text for p in blip] == ([""] if then_more else [])
        assert "your country" in final.text and "thank" not in final.text.lower()
        assert ("comparatively modern" in final.text) == then_more

    run(main)


def test_a_prompt_leads_partials_segments_and_finals() -> None:
    final, partial = _transcribe_options("en", StreamOptions(prompt="Project Gutenberg"), StreamLimits())
    assert final.initial_prompt == partial.initial_prompt == "Project Gutenberg"


def test_speech_events_announce_each_piece_before_its_text(tiny_en_engine: ModelEngine, vad: StreamingVAD) -> None:
    """With speech_events: SpeechStarted (prefix padding included), SpeechStopped at the cut, then the piece's
    SegmentReady, for each piece. Ending with drop_rest transcribes
    nothing after the last cut (the second sentence, still being spoken, is dropped)."""
    first = decode_audio(TEST_DATA / "1089-134691-0000.flac")  # HE COULD WAIT NO LONGER
    second = decode_audio(TEST_DATA / "LJ001-0002.wav")  # in being comparatively modern.
    lead = 8000  # 0.5 s of silence first: the padding shows in SpeechStarted

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        options = StreamOptions(segment_silence_ms=700, speech_events=True, preroll_ms=100)
        await session.start(options)
        audio = np.concatenate([np.zeros(lead, np.float32), first, np.zeros(24_000, np.float32), second])
        for chunk in frames(pcm16(audio)):
            await session.feed(chunk)
            await asyncio.sleep(0)
        await recorder.wait_for(SpeechStarted, 2)
        session.end(drop_rest=True)
        (final,) = await recorder.wait_for(Final)
        await session.close()
        named = {SpeechStarted: "started", SpeechStopped: "stopped", SegmentReady: "ready"}
        seen = [(named[type(e)], e.index if isinstance(e, SegmentReady) else e.piece) for e in recorder.events
                if type(e) in named]  # fmt: skip
        assert sorted(seen, key=lambda k: k[1]) == [("started", 0), ("stopped", 0), ("ready", 0), ("started", 1)]
        started, stopped = recorder.of(SpeechStarted)[0], recorder.of(SpeechStopped)[0]
        assert started.at_s >= lead / 16_000 and (round(started.at_s * 16_000) + 1600) % 512 == 0  # a frame - 0.1 s
        assert stopped.at_s == pytest.approx(recorder.of(SegmentReady)[0].piece.end)
        assert "wait no longer" in final.text.lower() and "modern" not in final.text.lower()

    run(main)


@pytest.mark.parametrize("click", [False, True])
def test_a_quiet_microphone_is_heard_by_the_vad(tiny_en_engine: ModelEngine, vad: StreamingVAD, click: bool) -> None:
    """Speech peaking at -50 dBFS: silero, whose probabilities follow the level, heard almost none of it, and a
    segmented turn (which keeps only what the VAD hears) ended empty. Raised by up to +20 dB, it is heard; a
    click before it (one loud frame) no longer keeps it unraised."""
    speech = decode_audio(TEST_DATA / "1089-134691-0000.flac")  # HE COULD WAIT NO LONGER
    quiet = np.concatenate([speech, np.zeros(24_000, np.float32)]) / np.abs(speech).max() * 10 ** (-50 / 20)
    if click:
        quiet = np.concatenate([np.zeros(8000), np.full(40, 0.3), np.zeros(8000), quiet])

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(segment_silence_ms=700))
        for chunk in frames(pcm16(quiet.astype(np.float32))):
            await session.feed(chunk)
            await asyncio.sleep(0)
        session.end()
        (final,) = await recorder.wait_for(Final)
        assert "wait no longer" in final.text.lower()
        await session.close()

    run(main)


def test_closing_mid_turn_frees_the_engine(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    engine = tiny_en_engine.engine

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine)
        await session.start(StreamOptions(partials=True))
        for chunk in frames(pcm16(jfk_audio)):
            await session.feed(chunk)
        session.end()  # the final's work is submitted…
        for _ in range(500):
            if engine.running or engine.queue_depth:
                break
            await asyncio.sleep(0.01)
        assert engine.running or engine.queue_depth
        await session.close()  # … and the client goes away
        for _ in range(300):
            if engine.running == 0 and engine.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.running == 0 and engine.queue_depth == 0
        assert not recorder.of(Final)
        assert not session.finishing

    run(main)


def test_turn_limit_ends_the_turn_and_keeps_what_fitted(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, StreamLimits(max_turn_s=2.0))
        await session.start(StreamOptions())
        errors = 0
        for chunk in frames(pcm16(jfk_audio[:48_000])):  # 3 s
            try:
                await session.feed(chunk)
            except AudioTooLong:
                errors += 1
        session.end()  # acknowledged quietly: the turn was already ended
        (final,) = await recorder.wait_for(Final)
        assert errors == 1
        assert final.duration == pytest.approx(2.0)
        assert final.text  # the two seconds that fitted were transcribed
        await session.close()

    run(main)


def test_turn_open_too_long_is_ended(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, StreamLimits(max_turn_s=10.0))
        await session.start(StreamOptions())
        for chunk in frames(pcm16(jfk_audio[:16_000])):
            await session.feed(chunk)
        await session.expire(time.monotonic() + 5)  # not yet
        assert session.turn is not None
        await session.expire(time.monotonic() + 11)
        assert session.turn is None
        await session.feed(b"\0\0" * 320)  # dropped quietly until the client's own end
        session.end()
        (final,) = await recorder.wait_for(Final)
        (error,) = recorder.of(StreamError)
        assert (error.code, error.turn) == ("turn_timeout", 1)
        assert final.duration == pytest.approx(1.0)
        await session.close()

    run(main)


def test_protocol_state_errors(tiny_en_engine: ModelEngine) -> None:
    async def main() -> None:
        session, recorder = session_for(tiny_en_engine)
        with pytest.raises(NoTurn):
            await session.feed(b"\0\0" * 320)
        await session.feed(b"\0\0" * 320)  # one error, not one per frame
        session.end()  # closes the discarding state quietly
        with pytest.raises(NoTurn):
            session.end()
        await session.start(StreamOptions())
        with pytest.raises(TurnActive):
            await session.start(StreamOptions())
        with pytest.raises(AudioDecodeError, match="even number"):
            await session.feed(b"\0\0\0")
        await session.feed(b"\0\0" * 320)
        session.end()
        (final,) = await recorder.wait_for(Final)
        assert final.duration == pytest.approx(0.02)
        await session.close()

    run(main)


def test_options_check_refuses_before_the_turn_opens(tiny_en_engine: ModelEngine) -> None:
    """The server's check (the one file requests use) sees the turn's options: translate on tiny.en is
    refused at start, no turn opens and no turn number is used up."""

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, check=check_options)
        with pytest.raises(InvalidRequest, match="English-only and cannot translate"):
            await session.start(StreamOptions(task="translate"))
        assert session.turn is None and not recorder.events
        await session.feed(b"\0\0" * 320)  # dropped quietly after the refused start
        session.end()
        await session.start(StreamOptions())
        assert recorder.events == [TurnStarted(1, tiny_en_engine.name, 16_000)]
        await session.close()

    run(main)


def test_end_all_delivers_the_open_turn(tiny_en_engine: ModelEngine, jfk_audio: np.ndarray) -> None:
    """What the server calls before closing a connection itself (idle timeout): the open turn is ended and
    its final emitted before end_all returns."""

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine)
        await session.start(StreamOptions())
        for chunk in frames(pcm16(jfk_audio[:32_000])):
            await session.feed(chunk)
        await session.end_all()
        (final,) = recorder.of(Final)
        assert final.duration == pytest.approx(2.0) and final.text
        assert session.turn is None and not session.finishing
        await session.end_all()  # nothing open: returns at once
        assert len(recorder.of(Final)) == 1
        await session.close()

    run(main)


async def cut_then_speak(session: LiveSession, vad_pause_s: float = 1.5) -> None:
    """Feed a spoken clip and a pause (the VAD cuts a segment there); the caller awaits the cut."""
    first = decode_audio(TEST_DATA / "1089-134691-0000.flac")
    for chunk in frames(pcm16(np.concatenate([first, np.zeros(int(vad_pause_s * 16_000), np.float32)]))):
        await session.feed(chunk)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_closing_after_end_cancels_the_segments_and_the_rest(
    tiny_en_engine: ModelEngine, vad: StreamingVAD, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that leaves after `end` of a segmented turn: the segment cut at the pause and the rest after
    it are both cancelled (the rest's transcription ran on to its end, holding engine slots, unowned)."""
    submitted: list[tuple[int, int]] = []

    async def slow(turn: LiveTurn, start: int, stop: int) -> Piece:
        submitted.append((start, stop))
        await asyncio.sleep(600)  # in the engine until cancelled
        raise AssertionError("not cancelled")

    monkeypatch.setattr(LiveTurn, "_transcribe", slow)

    async def main() -> None:
        session, recorder = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(segment_silence_ms=700))
        await cut_then_speak(session)
        await until(lambda: len(submitted) == 1, "the segment at the pause")
        await session.feed(pcm16(decode_audio(TEST_DATA / "LJ001-0002.wav")))
        session.end()
        await until(lambda: len(submitted) == 2, "the rest after the segment")
        await session.close()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not left, left
        assert not recorder.of(Final) and not recorder.of(StreamError)

    run(main)


def test_a_segment_that_failed_before_the_client_left_is_not_an_unretrieved_error(
    tiny_en_engine: ModelEngine, vad: StreamingVAD, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment refused by a full engine, then the client leaves before `end`: nobody is told (nobody is
    there), and asyncio must not log 'Task exception was never retrieved' with a traceback for it."""

    async def refused(turn: LiveTurn, start: int, stop: int) -> Piece:
        raise Overloaded("the engine queue is full")

    monkeypatch.setattr(LiveTurn, "_transcribe", refused)
    unretrieved: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unretrieved.append(context))
        session, _ = session_for(tiny_en_engine, vad=vad)
        await session.start(StreamOptions(segment_silence_ms=700))
        turn = session.turn
        assert turn is not None
        await cut_then_speak(session)
        await until(lambda: bool(turn.pieces) and turn.pieces[0].done(), "the segment's failure")
        await session.close()
        turn.pieces.clear()  # the failed segment's task is garbage now: asyncio would complain as it goes
        gc.collect()

    run(main)
    assert not unretrieved, unretrieved
