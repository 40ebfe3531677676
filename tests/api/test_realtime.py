"""/v1/realtime, OpenAI's Realtime API for transcription, on the real app with the real tiny.en engine and real
recordings sent as 24 kHz PCM16: manual commits, server VAD items, deltas, both session forms, errors that leave
the session usable, auth and shared limits; then the official `openai` SDK's realtime clients against a real
uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai import AsyncOpenAI
from starlette.websockets import WebSocketDisconnect
from websockets.sync.client import connect as ws_connect

from api.conftest import LiveServer, api_settings
from conftest import DEV_DIR, TEST_DATA, pcm16
from halkspeech.api.app import create_app
from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings, ModelSettings, ServerSettings, Settings
from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.pool import ModelPool
from halkspeech.errors import Overloaded
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription.streaming import LiveTurn

URL = "/v1/realtime?intent=transcription"
RATE = 24_000
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
MANUAL = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}  # GA: one commit, one item


def make_app(engine: ModelEngine, **server: Any) -> Any:
    """The real app whose pool hands out the shared tiny.en engine (no lifespan: it would close it)."""
    settings = Settings(
        model=ModelSettings(default="tiny.en"), engine=EngineSettings(device="cpu"), server=ServerSettings(**server)
    )
    return create_app(settings, ModelPool(settings, ModelRegistry(settings.model), loader=lambda key: engine))


def pcm24(name: str, silence_s: float = 0.0) -> bytes:
    """A test recording as OpenAI's audio: 16-bit little-endian mono PCM at 24 kHz, then `silence_s` of silence."""
    audio = np.concatenate([decode_audio(TEST_DATA / name, sample_rate=RATE), np.zeros(int(silence_s * RATE))])
    return pcm16(audio)


def appends(pcm: bytes, chunk_s: float = 0.1) -> Iterator[dict[str, Any]]:
    size = int(chunk_s * RATE) * 2
    for i in range(0, len(pcm), size):
        yield {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + size]).decode()}


def receive_until(ws: Any, kind: str, count: int = 1, limit: int = 500) -> list[dict[str, Any]]:
    """Events up to and including the `count`-th of `kind`."""
    seen: list[dict[str, Any]] = []
    for _ in range(limit):
        seen.append(ws.receive_json())
        if sum(e["type"] == kind for e in seen) == count:
            return seen
    raise AssertionError(f"no {kind} in {limit} events: {seen[-3:]}")


def update(ws: Any, session: dict[str, Any], kind: str = "session.update") -> dict[str, Any]:
    ws.send_json({"type": kind, "session": session})
    answer = ws.receive_json()
    assert answer["type"] == kind.replace("update", "updated"), answer
    return answer["session"]


@pytest.fixture(scope="module")
def client(tiny_en_engine: ModelEngine) -> TestClient:
    return TestClient(make_app(tiny_en_engine))


@pytest.fixture(scope="module")
def jfk24() -> bytes:
    return pcm24("jfk.flac")


def ws_final(client: TestClient, pcm: bytes) -> str:
    """The /ws final of the same PCM (sent at the same rate)."""
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "start", "sample_rate": RATE})
        for i in range(0, len(pcm), 4800):
            ws.send_bytes(pcm[i : i + 4800])
        ws.send_json({"type": "end"})
        final = receive_until(ws, "final")[-1]
    text: str = final["text"]
    return text


# -- the protocol -----------------------------------------------------------------------------------------


def test_a_manual_commit_gives_the_ws_final(client: TestClient, jfk24: bytes) -> None:
    """GA form, no turn detection: `session.created` at connect, `committed` at the commit, then `completed`
    with the /ws final's text; whisper-1, as OpenAI's, sends one delta with the whole transcript."""
    with client.websocket_connect(URL) as ws:
        created = ws.receive_json()
        assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
        assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
        session = update(
            ws, {**MANUAL, "audio": {"input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}}}
        )
        assert session["audio"]["input"]["turn_detection"] is None
        for append in appends(jfk24):
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.commit", "event_id": "evt_1"})
        events = receive_until(ws, COMPLETED)
    committed, delta, completed = events
    assert committed["type"] == "input_audio_buffer.committed" and committed["previous_item_id"] is None
    assert delta["type"] == DELTA and delta["item_id"] == completed["item_id"] == committed["item_id"]
    assert completed["transcript"] == delta["delta"] == ws_final(client, jfk24)
    assert "ask not what your country can do for you" in completed["transcript"]
    assert completed["content_index"] == 0 and completed["usage"] == {"type": "duration", "seconds": 11.0}
    assert all(e["event_id"].startswith("event_") for e in events)


def test_deltas_stream_while_speaking_and_add_up_to_the_transcript(client: TestClient, jfk24: bytes) -> None:
    """A streaming model name: deltas are the growth of partials' stable text, sent while audio arrives, and
    with the last one (the final's text after them) they add up to the transcript exactly."""
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        transcription = {"model": "gpt-4o-transcribe", "language": "en"}
        update(
            ws, {"type": "transcription", "audio": {"input": {"turn_detection": None, "transcription": transcription}}}
        )
        # At 2.5× real time, so that partials (every 0.4 s of new audio, one at a time) run while audio arrives.
        # Not waiting for a delta mid-stream: a partial starts only when audio comes, and the first ones' stable
        # text is empty (two hypotheses must agree), so a client that stops sending to wait may wait forever.
        for append in appends(jfk24, chunk_s=0.25):
            ws.send_json(append)
            time.sleep(0.1)
        ws.send_json({"type": "input_audio_buffer.commit"})
        events = receive_until(ws, COMPLETED)
    deltas = [e["delta"] for e in events if e["type"] == DELTA]
    kinds = [e["type"] for e in events]
    assert kinds.index(DELTA) < kinds.index("input_audio_buffer.committed")  # text while the user speaks
    transcript = events[-1]["transcript"]
    assert "".join(deltas) == transcript and "ask not what your country" in transcript
    assert len({e["item_id"] for e in events}) == 1


def test_server_vad_gives_an_item_per_pause(tiny_en_engine: ModelEngine) -> None:
    """Beta form (OpenAI-Beta header, transcription_session.update): speech, 1.5 s of silence, speech, silence.
    Each stretch of speech is an item: speech_started (with the prefix padding), speech_stopped, committed
    (naming the previous item), completed."""
    client = TestClient(make_app(tiny_en_engine))
    pcm = pcm24("1089-134691-0000.flac", 1.5) + pcm24("LJ001-0002.wav", 1.5)  # HE COULD WAIT NO LONGER; modern
    with client.websocket_connect(URL, headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        assert ws.receive_json()["type"] == "transcription_session.created"
        session = {"input_audio_format": "pcm16", "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
        shown = update(ws, session, "transcription_session.update")
        assert shown["turn_detection"] == {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                           "silence_duration_ms": 500}  # fmt: skip
        for append in appends(pcm):
            ws.send_json(append)
        events = receive_until(ws, COMPLETED, 2)
    first, second = dict.fromkeys(e["item_id"] for e in events if "item_id" in e)
    for item, previous in ((first, None), (second, first)):
        mine = [e for e in events if e.get("item_id") == item]
        assert [e["type"] for e in mine if e["type"] != DELTA] == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            COMPLETED,
        ]
        assert mine[2]["previous_item_id"] == previous
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    first_len = len(pcm24("1089-134691-0000.flac")) / 2 / RATE * 1000
    assert 0 <= starts[0] < stops[0] <= first_len + 500 < starts[1] < stops[1]  # ms from the session's start
    transcripts = [e["transcript"].lower() for e in events if e["type"] == COMPLETED]
    assert "wait no longer" in transcripts[0] and "comparatively modern" in transcripts[1]


VAD = {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}


def ends_once(events: list[dict[str, Any]]) -> dict[str, str]:
    """Item id → how it ended; every item any event named ends exactly once (completed or failed)."""
    named = {e["item_id"] for e in events if "item_id" in e}
    ends = [(e["item_id"], e["type"].rsplit(".", 1)[1]) for e in events if e["type"].endswith(("completed", "failed"))]
    assert sorted(i for i, _ in ends) == sorted(named), events
    return dict(ends)


def test_commit_and_clear_while_speaking_with_server_vad(client: TestClient) -> None:
    """A commit in the middle of speech commits what was said so far as the item (speech_stopped first);
    a clear drops it: the item announced by speech_started then fails as cleared."""
    speech = pcm24("LJ001-0002.wav")  # no pause after it: the VAD alone would not end the item
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, VAD)
        for append in appends(speech):
            ws.send_json(append)
        receive_until(ws, "input_audio_buffer.speech_started")
        ws.send_json({"type": "input_audio_buffer.commit"})
        committed = receive_until(ws, COMPLETED)
        for append in appends(speech):
            ws.send_json(append)
        receive_until(ws, "input_audio_buffer.speech_started")
        ws.send_json({"type": "input_audio_buffer.clear"})
        cleared = receive_until(ws, "conversation.item.input_audio_transcription.failed")
    assert [e["type"] for e in committed if e["type"] != DELTA] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        COMPLETED,
    ]
    assert "comparatively modern" in committed[-1]["transcript"].lower()
    assert [e["type"] for e in cleared if e["type"] != DELTA] == [
        "input_audio_buffer.cleared",
        "input_audio_buffer.speech_stopped",
        "conversation.item.input_audio_transcription.failed",
    ]
    assert cleared[-1]["error"]["code"] == "input_audio_buffer_cleared"


def test_a_server_vad_session_outlives_the_turn_limit(tiny_en_engine: ModelEngine) -> None:
    """With ws_max_turn_s = 3, a server_vad session of 9.5 s goes on: its turn is renewed at a pause, no
    error is told, and each sentence is an item with its text."""
    client = TestClient(make_app(tiny_en_engine, ws_max_turn_s=3.0))
    sentences = ["LJ001-0002.wav", "1089-134691-0000.flac", "LJ001-0002.wav"]
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, VAD)
        for name in sentences:
            for append in appends(pcm24(name, 1.2)):
                ws.send_json(append)
        events = receive_until(ws, COMPLETED, 3)
    assert all(e["type"] != "error" for e in events)
    assert set(ends_once(events).values()) == {"completed"}
    said = {e["item_id"]: e["transcript"].lower() for e in events if e["type"] == COMPLETED}
    transcripts = [said[e["item_id"]] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert ["modern" in transcripts[0], "wait no longer" in transcripts[1], "modern" in transcripts[2]] == [True] * 3, (
        transcripts
    )


def test_a_transcription_that_fails_fails_its_item(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def overloaded(turn: LiveTurn, ended: float) -> Any:
        raise Overloaded("the engine queue is full")

    monkeypatch.setattr(LiveTurn, "_final", overloaded)
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        for append in appends(pcm24("LJ001-0002.wav")):
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.commit"})
        events = receive_until(ws, "conversation.item.input_audio_transcription.failed")
    assert next(e["type"] for e in events if e["type"] != DELTA) == "input_audio_buffer.committed"
    assert events[-1]["error"] == {
        "type": "server_error",
        "code": "overloaded",
        "message": "the engine queue is full",
        "param": None,
        "event_id": None,
    }
    assert ends_once(events) == {events[-1]["item_id"]: "failed"}


def test_session_updates_in_either_form_show_the_effective_settings(client: TestClient) -> None:
    """Unknown fields are ignored, a too-short pause is raised to the VAD's shortest, OpenAI's model names
    stay as the client gave them; each update is answered in its own form."""
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        ga = {
            "type": "transcription",
            "include": ["item.input_audio_transcription.logprobs"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 16_000},
                    "noise_reduction": {"type": "near_field"},
                    "transcription": {"model": "gpt-4o-mini-transcribe", "language": "en", "prompt": "JFK"},
                    "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 50},
                }
            },
        }
        shown = update(ws, ga)["audio"]["input"]
        assert shown["format"]["rate"] == 16_000 and shown["noise_reduction"] is None
        assert shown["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "en", "prompt": "JFK"}
        assert shown["turn_detection"] == {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 300,
                                           "silence_duration_ms": 100}  # fmt: skip
        beta = {"modalities": ["text"], "input_audio_transcription": {"model": "tiny.en"}, "turn_detection": None}
        shown = update(ws, beta, "transcription_session.update")
        assert shown["input_audio_transcription"]["model"] == "tiny.en" and shown["turn_detection"] is None
        assert update(ws, {"type": "transcription"})["audio"]["input"]["format"]["rate"] == 16_000  # unchanged


def test_the_session_clock_counts_audio_at_the_rate_it_was_read(client: TestClient) -> None:
    """A rate update leaves the open manual buffer at its own rate (docs/realtime.md): its audio is read, and
    counted on the session's clock, at that rate. Counted at the new one, the next items' audio_*_ms were off."""
    second = b"\0\0" * RATE  # 1 s at 24 kHz
    half_rate = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE // 2}}}}
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        ws.send_json(next(appends(second, chunk_s=1.0)))
        update(ws, half_rate)  # the open buffer stays at 24 kHz
        ws.send_json(next(appends(second, chunk_s=1.0)))
        ws.send_json({"type": "input_audio_buffer.commit"})
        assert receive_until(ws, COMPLETED)[-1]["usage"]["seconds"] == 2.0
        update(ws, VAD)  # 12 kHz from here
        speech = pcm16(decode_audio(TEST_DATA / "LJ001-0002.wav", sample_rate=RATE // 2))
        for append in appends(speech + bytes(RATE), chunk_s=0.1):
            ws.send_json(append)
        started = receive_until(ws, "input_audio_buffer.speech_started")[-1]
    assert 1500 <= started["audio_start_ms"] < 2500  # after the 2 s before it (less the prefix padding)


def test_keywords_are_favoured(client: TestClient) -> None:
    """`transcription.keywords` are the turn's hotwords (faster-whisper's own hotwords test clip)."""
    clip = DEV_DIR / "faster-whisper-tests" / "hotwords.mp3"
    if not clip.exists():
        pytest.skip("../shared/data/dev is not beside this checkout")
    audio = decode_audio(clip, sample_rate=RATE)
    pcm = pcm16(audio)
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        transcription = {"model": "whisper-1", "keywords": ["ComfyUI"]}
        shown = update(
            ws, {"type": "transcription", "audio": {"input": {"turn_detection": None, "transcription": transcription}}}
        )
        assert shown["audio"]["input"]["transcription"]["keywords"] == ["ComfyUI"]
        for append in appends(pcm):
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.commit"})
        completed = receive_until(ws, COMPLETED)[-1]
    assert "ComfyUI" in completed["transcript"]  # without: "comfy eye"


def test_bad_events_get_errors_and_the_session_goes_on(client: TestClient) -> None:
    """Each bad event gets one `error` in OpenAI's shape (naming the client's event_id and the field), changes
    nothing, and the buffer open around them loses no audio."""
    pcm = pcm24("LJ001-0002.wav")
    cases: list[tuple[Any, str, str | None]] = [
        ("not json", "invalid_json", None),
        ("[" * 3000 + "]" * 3000, "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ({"type": "input_audio_buffer.flush"}, "invalid_event", None),
        ({"event_id": "e1"}, "invalid_event", None),
        ({"type": "response.create", "event_id": "e2"}, "invalid_event", "type"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_audio", "audio"),
        ({"type": "input_audio_buffer.append", "audio": 5}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0\0").decode()}, "invalid_audio", None),
        ({"type": "session.update", "session": "fast"}, "invalid_value", "session"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
        (
            {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": "high"}}}}},
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}},
            "invalid_value",
            "session.audio.input.turn_detection.type",
        ),
        (
            {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
            "invalid_value",
            "session.audio.input.format.type",
        ),
        (
            {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 1000}}}}},
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {"type": "transcription_session.update", "session": {"input_audio_transcription": {"language": "xx"}}},
            "invalid_value",
            "session.input_audio_transcription.language",
        ),
        (
            {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": "no-such-model"}}}}},
            "model_not_found",
            "session.audio.input.transcription.model",
        ),
    ]
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        ws.send_json({"type": "input_audio_buffer.commit", "event_id": "c0"})
        error = ws.receive_json()["error"]
        assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "c0")
        chunks = list(appends(pcm))
        for append in chunks[:10]:
            ws.send_json(append)
        for message, code, param in cases:
            ws.send_text(message if isinstance(message, str) else json.dumps(message))
            answer = ws.receive_json()
            assert answer["type"] == "error", (message, answer)
            error = answer["error"]
            assert (error["code"], error["param"]) == (code, param), (str(message)[:80], error)
            assert error["type"] == "invalid_request_error" and 0 < len(error["message"]) < 1000
            assert error["event_id"] == (message.get("event_id") if isinstance(message, dict) else None)
        ws.send_bytes(b"\0\0" * 100)
        assert ws.receive_json()["error"]["code"] == "invalid_event"  # audio goes in appends, as base64
        for append in chunks[10:]:
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.commit"})
        completed = receive_until(ws, COMPLETED)[-1]
    assert "comparatively modern" in completed["transcript"].lower()
    assert completed["usage"]["seconds"] == pytest.approx(len(pcm) / 2 / RATE, abs=0.02)  # nothing was lost


def test_an_event_over_the_frame_limit_is_refused_and_the_session_goes_on(tiny_en_engine: ModelEngine) -> None:
    """Appends may be as large as the server's frame limit allows (15 MiB at most, as at OpenAI): with a 1 s
    turn limit that is 1.14 MB; a larger event gets one error, parsed or not."""
    client = TestClient(make_app(tiny_en_engine, ws_max_turn_s=1.0))
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 1_200_000})
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        ws.send_text(big)
        error = ws.receive_json()["error"]
        assert error["code"] == "invalid_event" and "at most 1144576 characters" in error["message"]
        ws.send_json({"type": "input_audio_buffer.clear"})
        assert ws.receive_json()["type"] == "input_audio_buffer.cleared"


def test_a_full_buffer_is_committed(tiny_en_engine: ModelEngine) -> None:
    """Without turn detection, a buffer that reaches ws_max_turn_s is committed with what fitted, and the next
    append opens the next item."""
    client = TestClient(make_app(tiny_en_engine, ws_max_turn_s=1.0))
    pcm = pcm24("LJ001-0002.wav")  # 1.9 s
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        ws.send_json(next(appends(pcm, chunk_s=10.0)))
        events = receive_until(ws, COMPLETED)
        for append in list(appends(pcm))[:5]:
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.commit"})
        after = receive_until(ws, COMPLETED)
    assert [e["type"] for e in events if e["type"] != DELTA] == ["error", "input_audio_buffer.committed", COMPLETED]
    assert events[0]["error"]["code"] == "audio_too_long" and events[-1]["usage"]["seconds"] == 1.0
    assert after[0]["previous_item_id"] == events[-1]["item_id"] and after[-1]["usage"]["seconds"] == 0.5


def test_a_commit_of_exactly_100_ms_is_taken(client: TestClient) -> None:
    """OpenAI's least commit is 100 ms, inclusive. The resampler (24 → 16 kHz) holds back 16 samples until the
    end: counted without them, 100 ms appended was 99 ms and the commit was refused as empty."""
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        ws.send_json(next(appends(pcm24("LJ001-0002.wav")[: RATE // 10 * 2], chunk_s=0.1)))  # 2,400 samples
        ws.send_json({"type": "input_audio_buffer.commit"})
        events = receive_until(ws, COMPLETED)
    assert events[0]["type"] == "input_audio_buffer.committed", events[0]
    assert events[-1]["usage"]["seconds"] == 0.1


def test_clear_drops_the_buffer(client: TestClient, jfk24: bytes) -> None:
    with client.websocket_connect(URL) as ws:
        ws.receive_json()
        update(ws, MANUAL)
        for append in list(appends(jfk24))[:20]:
            ws.send_json(append)
        ws.send_json({"type": "input_audio_buffer.clear"})
        assert ws.receive_json()["type"] == "input_audio_buffer.cleared"
        ws.send_json({"type": "input_audio_buffer.commit"})
        assert ws.receive_json()["error"]["code"] == "input_audio_buffer_commit_empty"


def test_api_keys_by_header_or_browser_subprotocol(tiny_en_engine: ModelEngine) -> None:
    client = TestClient(make_app(tiny_en_engine, api_keys=["s3cret"]))
    for headers, protocols in (({}, ["realtime"]), ({"Authorization": "Bearer wrong"}, [])):
        with client.websocket_connect(URL, headers=headers, subprotocols=protocols) as ws:
            refused = ws.receive_json()
            assert refused["type"] == "error" and refused["error"]["code"] == "invalid_api_key"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
    with client.websocket_connect(URL, headers={"Authorization": "Bearer s3cret"}) as ws:
        assert ws.receive_json()["type"] == "session.created"
    protocols = ["realtime", "openai-insecure-api-key.s3cret", "openai-beta.realtime-v1"]
    with client.websocket_connect(URL, subprotocols=protocols) as ws:
        assert ws.accepted_subprotocol == "realtime"  # a browser fails a handshake that picks none of its own
        assert ws.receive_json()["type"] == "transcription_session.created"


def test_the_session_limit_counts_every_live_protocol(tiny_en_engine: ModelEngine) -> None:
    client = TestClient(make_app(tiny_en_engine, ws_max_sessions=1))
    with client.websocket_connect("/ws") as first:
        first.send_json({"type": "start"})
        assert first.receive_json()["type"] == "started"
        with client.websocket_connect(URL) as second:
            assert second.receive_json()["error"]["code"] == "too_many_sessions"
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == 1013


def test_protocol_is_described_over_http(client: TestClient) -> None:
    described = client.get("/v1/realtime")
    assert described.status_code == 200 and "input_audio_buffer.append" in described.json()["client_events"]


# -- the official SDK against a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_en_engine: ModelEngine) -> Iterator[LiveServer]:
    running = LiveServer(api_settings(api_keys=["s3cret"]), tiny_en_engine).start()
    yield running
    running.stop()


def test_the_openai_sdk_realtime_clients_transcribe(server: LiveServer, jfk24: bytes) -> None:
    """`client.realtime.connect(extra_query={"intent": "transcription"})` (GA) and `client.beta.realtime`
    (beta), pointed at this server's /v1 as they would be at OpenAI's."""
    audio = base64.b64encode(jfk24).decode()
    ws_url = server.url.replace("http://", "ws://") + "/v1"

    async def transcribe(beta: bool) -> list[Any]:
        client = AsyncOpenAI(base_url=server.url + "/v1", websocket_base_url=ws_url, api_key="s3cret")
        if beta:
            manager = client.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"})
        else:
            manager = client.realtime.connect(extra_query={"intent": "transcription"})
        events = []
        async with manager as connection:
            if beta:
                session = {"input_audio_format": "pcm16", "turn_detection": None}
                await connection.transcription_session.update(session=session)  # type: ignore[arg-type]
            else:
                await connection.session.update(session=MANUAL)  # type: ignore[arg-type]
            await connection.input_audio_buffer.append(audio=audio)
            await connection.input_audio_buffer.commit()
            async for event in connection:
                events.append(event)
                if event.type == COMPLETED:
                    return events
        return events

    for beta in (False, True):
        events = asyncio.run(transcribe(beta))
        assert [e.type for e in events[:2]] == (
            ["transcription_session.created", "transcription_session.updated"]
            if beta
            else ["session.created", "session.updated"]
        )
        assert "ask not what your country can do for you" in events[-1].transcript, beta


def test_lone_surrogates_are_refused_as_invalid_json(server: LiveServer) -> None:
    """JSON may escape a lone surrogate (`\\ud800`), which no UTF-8 text frame can carry back: an event holding
    one is refused whole (invalid_json) before anything echoes it or keeps it. Echoed (an event_id in an error,
    keywords in session.updated), it failed to send as an internal_error, and the keywords stayed in the session
    all the same. An escaped surrogate pair (an emoji) is valid text and passes."""
    url = server.url.replace("http://", "ws://") + URL
    lone = [
        json.dumps({"type": "input_audio_buffer.flush", "event_id": "\ud800"}),
        json.dumps(
            {"type": "session.update", "session": {"audio": {"input": {"transcription": {"keywords": ["\udfff"]}}}}}
        ),
        '{"type": "session.update", "session": {"\\ud800": 1}}',  # a key, too
    ]
    with ws_connect(url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        for text in lone:
            ws.send(text)
            error = json.loads(ws.recv())["error"]
            assert (error["code"], error["event_id"]) == ("invalid_json", None), (text, error)
            assert "surrogate" in error["message"]
        emoji = {"transcription": {"keywords": ["ComfyUI \U0001f600"]}}
        ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": emoji}}}))  # ensure_ascii: a pair
        shown = json.loads(ws.recv())
    assert shown["type"] == "session.updated"
    assert shown["session"]["audio"]["input"]["transcription"]["keywords"] == ["ComfyUI \U0001f600"]
