"""The engine on the CPU with the real tiny.en weights: batching, slot reuse, cancellation, beam search."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions
from whisper.model import Whisper as Reference

from halkspeech.audio import decode_audio, log_mel_spectrogram, pad_or_trim
from halkspeech.config import EngineSettings
from halkspeech.engine.engine import DURATION_BUCKETS, DecodeHandle, Durations
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.engine.request import DecodeRequest, DecodeResult, SamplingOptions
from halkspeech.errors import Cancelled, EngineStopped, InvalidRequest, Overloaded
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

TEST_DATA = Path(__file__).resolve().parents[1] / "data"
CLIPS = ("jfk.flac", "LJ001-0002.wav", "1089-134691-0000.flac", "test_de.wav")


@pytest.fixture(scope="module")
def windows() -> list[torch.Tensor]:
    """The first 30 s log-mel window of each committed clip: [80, 3000] each."""
    out = []
    for name in CLIPS:
        audio = decode_audio(TEST_DATA / name)
        out.append(pad_or_trim(log_mel_spectrogram(audio, 80, padding=480_000)[:, :3000], 3000))
    return out


@pytest.fixture
def small_engine(tiny_en_weights: LoadedWeights) -> Iterator[ModelEngine]:
    """Two slots only, so six requests must reuse them."""
    model = start_engine(tiny_en_weights, EngineSettings(device="cpu", max_slots=2, max_queue=8))
    yield model
    model.close()


def make_request(model: ModelEngine, mel: torch.Tensor, **options: object) -> DecodeRequest:
    tok = model.tokenizer
    prompt, sot = tok.decoder_prompt("en", "transcribe", timestamps=True)
    sampling = SamplingOptions(suppress_tokens=tok.suppress_tokens(), **options)  # type: ignore[arg-type]
    return DecodeRequest(mel, prompt, sot, sampling)


def decode_alone(model: ModelEngine, mel: torch.Tensor, **options: object) -> DecodeResult:
    return model.engine.submit(make_request(model, mel, **options)).result(timeout=120)


def test_batched_results_equal_one_at_a_time(tiny_en_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    alone = [decode_alone(tiny_en_engine, mel).tokens for mel in windows]
    steps_before = tiny_en_engine.engine.stats.steps
    handles = [tiny_en_engine.engine.submit(make_request(tiny_en_engine, mel)) for mel in windows * 2]
    together = [h.result(timeout=120).tokens for h in handles]
    assert together == alone * 2
    text = tiny_en_engine.tokenizer.decode(list(alone[0]))
    assert "ask not what your country can do for you" in text
    # eight windows decoded together take about as many steps as the longest one, not the sum
    assert tiny_en_engine.engine.stats.steps - steps_before < sum(len(t) for t in alone)
    assert max(tiny_en_engine.engine.stats.decode_batches) > 1


def test_a_batch_is_taken_whole(small_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    """submit_many: one encoder run and one admission for windows that fit the slots, results as one at a time;
    a batch larger than the queue is refused whole."""
    expected = [decode_alone(small_engine, mel).tokens for mel in windows[:2]]
    engine = small_engine.engine
    runs, admits = sum(engine.stats.encoder_batches.values()), engine.stats.admit_calls
    handles = engine.submit_many([make_request(small_engine, mel) for mel in windows[:2]])
    assert [h.result(timeout=120).tokens for h in handles] == expected
    assert sum(engine.stats.encoder_batches.values()) - runs == 1 and engine.stats.admit_calls - admits == 1
    rejected = engine.stats.rejected
    with pytest.raises(Overloaded):
        engine.submit_many([make_request(small_engine, windows[0])] * 9)  # max_queue 8
    assert engine.queue_depth == 0 and engine.stats.rejected - rejected == 9  # counted (a metric's outcome)


def test_slots_are_reused(small_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    expected = [decode_alone(small_engine, mel).tokens for mel in windows[:3]]
    handles = [small_engine.engine.submit(make_request(small_engine, mel)) for mel in windows[:3] * 2]
    assert [h.result(timeout=120).tokens for h in handles] == expected * 2
    assert small_engine.engine.running == 0 and small_engine.engine.queue_depth == 0


def test_each_completed_window_counts_its_queue_wait_and_its_time(
    small_engine: ModelEngine, windows: list[torch.Tensor]
) -> None:
    """The histograms /metrics reads: six windows for two slots, so some wait."""
    engine = small_engine.engine
    handles = [engine.submit(make_request(small_engine, mel)) for mel in windows[:3] * 2]
    results = [h.result(timeout=120) for h in handles]
    waits, times = engine.stats.queue_wait, engine.stats.window_time
    assert sum(waits.counts) == sum(times.counts) == 6
    assert 0 < waits.total_s < times.total_s
    assert waits.total_s == pytest.approx(sum(r.queue_ms for r in results) / 1000)  # each result's own wait


def test_durations_fall_in_prometheus_buckets() -> None:
    durations = Durations()
    for seconds in (0.0, 0.005, 0.0051, 60.0, 61.0):
        durations.add(seconds)
    assert durations.counts[:2] == [2, 1] and durations.counts[-2:] == [1, 1]  # a bound is "at or under"
    assert len(durations.counts) == len(DURATION_BUCKETS) + 1 and durations.total_s == pytest.approx(121.0101)


def test_queue_limit_answers_at_once(small_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    long = {"max_new_tokens": 200, "force_length": True, "timestamps": False}
    handles = []
    with pytest.raises(Overloaded):
        for _ in range(20):
            handles.append(small_engine.engine.submit(make_request(small_engine, windows[0], **long)))
    for handle in handles:
        handle.cancel()
    for handle in handles:
        with pytest.raises(Cancelled):
            handle.result(timeout=60)


def test_queue_depth_counts_windows_not_messages(
    small_engine: ModelEngine, windows: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the loop has not taken them in: a batch of three windows is three (it was one message, so one),
    and cancels are no queued work (a burst of them, after clients left, filled the queue and refused work)."""
    engine = small_engine.engine
    monkeypatch.setattr(engine, "_drain", lambda block: time.sleep(0.01))  # the loop takes nothing in …
    time.sleep(0.6)  # … once its blocking wait (0.5 s) has returned
    handles = engine.submit_many([make_request(small_engine, w) for w in windows[:3]])
    assert engine.queue_depth == 3
    for handle in handles:
        handle.cancel()
    assert engine.queue_depth == 3
    with pytest.raises(Overloaded):
        engine.submit_many([make_request(small_engine, w) for w in windows] * 2)  # 8 - 3 = 5 fit, not 8
    monkeypatch.undo()
    for handle in handles:
        with pytest.raises(Cancelled):
            handle.result(timeout=60)
    _wait_for(lambda: engine.queue_depth == 0 and engine.running == 0)


def test_a_cancel_during_a_cpu_encoder_run_is_seen_before_admission(
    small_engine: ModelEngine, windows: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU encoder run holds the engine thread for seconds; a client that leaves meanwhile has its window
    cancelled before the admission that follows the run, not decoded first."""
    engine = small_engine.engine
    submitted = threading.Event()
    handles: list[DecodeHandle] = []
    encode = engine.runner.encode_async

    def encode_then_cancel(*args: Any, **kwargs: Any) -> Any:
        job = encode(*args, **kwargs)
        submitted.wait(10)
        handles[0].cancel()  # the client leaves while the run is under way
        return job

    monkeypatch.setattr(engine.runner, "encode_async", encode_then_cancel)
    admitted = engine.stats.admitted
    handles.extend(engine.submit_many([make_request(small_engine, w) for w in windows[:2]]))
    submitted.set()
    with pytest.raises(Cancelled):
        handles[0].result(timeout=60)
    assert handles[1].result(timeout=60).tokens
    assert engine.stats.admitted == admitted + 1


def test_cancel_frees_the_slot(small_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    engine = small_engine.engine
    long = {"max_new_tokens": 220, "force_length": True, "timestamps": False}
    running = [engine.submit(make_request(small_engine, windows[0], **long)) for _ in range(2)]
    waiting = engine.submit(make_request(small_engine, windows[1]))
    _wait_for(lambda: engine.running == 2)
    for handle in running:
        handle.cancel()
    for handle in running:
        with pytest.raises(Cancelled):
            handle.result(timeout=60)
    # the waiting request got a freed slot and completed normally
    assert "modern" in small_engine.tokenizer.decode(list(waiting.result(timeout=60).tokens))
    _wait_for(lambda: engine.running == 0)
    assert engine.stats.cancelled >= 2


def test_beam_search_matches_reference(
    tiny_en_engine: ModelEngine, tiny_en_weights: LoadedWeights, windows: list[torch.Tensor]
) -> None:
    reference = Reference(ModelDimensions(**tiny_en_weights.dims.as_dict()))
    reference.load_state_dict({k: v.float() for k, v in tiny_en_weights.state_dict.items()})
    reference.eval()
    for mel in windows[:3]:
        expected = whisper.decode(reference, mel, whisper.DecodingOptions(beam_size=5, fp16=False, language="en"))
        ours = decode_alone(tiny_en_engine, mel, beam_size=5)
        assert list(ours.tokens) == expected.tokens
        assert ours.avg_logprob == pytest.approx(expected.avg_logprob, abs=1e-4)


def test_sampling_best_of(tiny_en_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    result = decode_alone(tiny_en_engine, windows[0], temperature=0.6, best_of=3)
    assert result.temperature == 0.6 and len(result.tokens) > 5
    assert -5 < result.avg_logprob < 0


def test_tokens_stream_as_they_are_decoded(tiny_en_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    seen: list[int] = []
    handle = tiny_en_engine.engine.submit(make_request(tiny_en_engine, windows[0]), on_tokens=seen.extend)
    result = handle.result(timeout=60)
    assert tuple(seen) == result.tokens  # every token, in order, end-of-text excluded


def fail_first_call(monkeypatch: pytest.MonkeyPatch, target: object, name: str, message: str) -> None:
    """Make target.name raise RuntimeError(message) once, then behave as before."""
    real = getattr(target, name)
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)


def test_a_failed_step_fails_its_requests_not_the_engine(
    small_engine: ModelEngine, windows: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_first_call(monkeypatch, small_engine.engine.runner, "launch_step", "simulated device fault")
    first = small_engine.engine.submit(make_request(small_engine, windows[0]))
    with pytest.raises(RuntimeError, match="simulated device fault"):
        first.result(timeout=60)
    second = decode_alone(small_engine, windows[1])
    assert "modern" in small_engine.tokenizer.decode(list(second.tokens))
    assert small_engine.engine.alive


def test_language_detection_matches_reference(base_engine: ModelEngine, base_weights: LoadedWeights) -> None:
    reference = Reference(ModelDimensions(**base_weights.dims.as_dict()))
    reference.load_state_dict({k: v.float() for k, v in base_weights.state_dict.items()})
    reference.eval()
    tok = base_engine.tokenizer
    for name, code in (("test_de.wav", "de"), ("jfk.flac", "en")):
        audio = decode_audio(TEST_DATA / name)
        mel = pad_or_trim(log_mel_spectrogram(audio, 80, padding=480_000)[:, :3000], 3000)
        _, expected = reference.detect_language(mel)
        prompt, sot = tok.decoder_prompt("en", "transcribe")
        request = DecodeRequest(mel, prompt, sot, SamplingOptions(max_new_tokens=0), detect_language=True)
        result = base_engine.engine.submit(request).result(timeout=60)
        assert result.language == code and result.finish_reason == "detected"
        assert result.language_probs is not None
        assert result.language_probs[code] == pytest.approx(expected[code], abs=1e-4)


def _wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_a_failed_encoder_run_fails_its_requests_not_the_engine(
    small_engine: ModelEngine, windows: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_first_call(monkeypatch, small_engine.engine.runner, "encode_async", "simulated out of memory")
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        decode_alone(small_engine, windows[0])
    assert "modern" in small_engine.tokenizer.decode(list(decode_alone(small_engine, windows[1]).tokens))
    assert small_engine.engine.alive and small_engine.engine.queue_depth == 0


def test_a_slot_left_past_the_context_fails_no_later_step(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    """Windows forced to 224 tokens after a full previous-text prompt take their last token at the context's
    last position; a step launched before that end is read advances the slot once more, past the context.
    The next steps that spanned the idle slot indexed past the positional embedding and failed every
    running request (an IndexError here; on a GPU, the next slot's first cache row overwritten)."""
    audio = np.concatenate([decode_audio(jfk_path)] * 4)  # 44 s: two windows, the second one's prompt full
    options = TranscribeOptions(force_decode_tokens=224, without_timestamps=True)

    async def staggered(delay: float) -> Transcript:
        await asyncio.sleep(delay)
        return await Transcriber(tiny_en_engine).transcribe(audio, options)

    async def main() -> list[Transcript]:
        return await asyncio.gather(*(staggered(d) for d in (0.0, 1.5, 3.0)))

    failed = tiny_en_engine.engine.stats.failed
    transcripts = asyncio.run(main())
    assert [len(t.segments) for t in transcripts] == [2, 2, 2]
    assert tiny_en_engine.engine.stats.failed == failed


# -- a caller's mistakes fail only that caller's request ------------------------------------------------------


def test_a_future_the_caller_cancelled_neither_kills_the_engine_nor_keeps_decoding(
    small_engine: ModelEngine, windows: list[torch.Tensor]
) -> None:
    """asyncio.wrap_future under a timeout cancels the engine's future itself. Setting it later raised
    InvalidStateError on the engine thread, which ended the loop and failed everything in flight (a refused
    request was enough: 3 beams on 2 slots). Now its work is cancelled and the engine goes on."""
    engine = small_engine.engine
    inside, go_on = threading.Event(), threading.Event()

    def hold(tokens: list[int]) -> None:  # runs on the engine thread: holds it until the caller has given up
        inside.set()
        go_on.wait(60)

    tokens = engine.stats.tokens
    long = engine.submit(make_request(small_engine, windows[0], force_length=True, max_new_tokens=150), hold)
    assert inside.wait(60)

    async def impatient(**options: object) -> None:
        handle = engine.submit(make_request(small_engine, windows[1], **options))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(handle.future), 0.01)

    asyncio.run(impatient(beam_size=3))  # refused by the engine after the caller gave up on it (the engine held)
    go_on.set()
    asyncio.run(impatient(force_length=True, max_new_tokens=200))  # decoding: its slot is freed, not kept busy
    assert len(long.result(timeout=120).tokens) == 150
    _wait_for(lambda: engine.running == 0)
    assert engine.stats.tokens - tokens < 150 + 100  # the cancelled one stopped well short of its 200
    _wait_for(lambda: engine.queue_depth == 0 and engine.running == 0)
    assert engine.alive and engine.stats.cancelled >= 1
    assert "modern" in small_engine.tokenizer.decode(list(decode_alone(small_engine, windows[1]).tokens))


def test_a_token_listener_that_raises_is_detached_and_nothing_fails(
    tiny_en_engine: ModelEngine, windows: list[torch.Tensor]
) -> None:
    """It failed every running request with its error, and requests that finished in that iteration were
    never completed (their callers waited forever)."""
    engine = tiny_en_engine.engine

    def broken(tokens: list[int]) -> None:
        raise ValueError("listener broke")

    handles = [
        engine.submit(make_request(tiny_en_engine, windows[1]), on_tokens=broken),
        engine.submit(make_request(tiny_en_engine, windows[0])),
        engine.submit(make_request(tiny_en_engine, windows[1], max_new_tokens=1)),
    ]
    results = [h.result(timeout=120) for h in handles]
    assert "modern" in tiny_en_engine.tokenizer.decode(list(results[0].tokens))
    assert len(results[2].tokens) == 1 and engine.alive


@pytest.mark.parametrize("case", ["prompt over the context", "token outside the vocabulary"])
def test_a_request_the_model_cannot_take_is_refused_alone(
    small_engine: ModelEngine, windows: list[torch.Tensor], case: str
) -> None:
    """Admitted, it failed the admission (a 461-token prompt) or the step (suppressing token 99999), and with
    it every other running request."""
    engine, tok = small_engine.engine, small_engine.tokenizer
    good = engine.submit(make_request(small_engine, windows[0], force_length=True, max_new_tokens=60))
    if case == "prompt over the context":
        prompt, sot = tok.decoder_prompt("en", "transcribe")
        bad = DecodeRequest(windows[1], (tok.sot_prev, *[440] * 456, *prompt), sot + 457, SamplingOptions())
    else:
        prompt, sot = tok.decoder_prompt("en", "transcribe")
        bad = DecodeRequest(windows[1], prompt, sot, SamplingOptions(suppress_tokens=(99_999,)))
    with pytest.raises(InvalidRequest, match=r"context holds 448|outside the vocabulary"):
        engine.submit(bad).result(timeout=60)
    assert len(good.result(timeout=120).tokens) == 60


def test_a_prefix_longer_than_half_the_context_keeps_its_end(tiny_en_engine: ModelEngine) -> None:
    tok = tiny_en_engine.tokenizer
    prefix = tok.encode(" word" * 460)
    prompt, _ = tok.decoder_prompt("en", "transcribe", previous=tok.encode(" x" * 300), prefix=prefix)
    assert len(prompt) <= 448 and prompt[-5:] == tuple(prefix[-5:])


def test_max_new_tokens_0_gives_no_token(tiny_en_engine: ModelEngine, windows: list[torch.Tensor]) -> None:
    """The reference's sample loop runs zero times; the admission's first token was kept (greedy and beam)."""
    for options in ({}, {"beam_size": 2}):
        result = decode_alone(tiny_en_engine, windows[0], max_new_tokens=0, **options)
        assert result.tokens == () and result.finish_reason == "length", options


def test_a_stopped_engine_counts_nothing_as_queued_or_running(
    tiny_en_weights: LoadedWeights, windows: list[torch.Tensor]
) -> None:
    """After close, the queue and running counts stayed at what was in flight (metrics, and the pool's idea
    of whether the model is busy); every request failed, and now each counts as failed."""
    model = start_engine(tiny_en_weights, EngineSettings(device="cpu", max_slots=2))
    engine = model.engine
    handles = [engine.submit(make_request(model, windows[0], force_length=True, max_new_tokens=200)) for _ in range(6)]
    _wait_for(lambda: engine.running > 0)
    model.close()
    assert all(isinstance(h.future.exception(timeout=10), EngineStopped) for h in handles)
    assert (engine.queue_depth, engine.running, engine.stats.failed) == (0, 0, 6)
