"""The live protocols' control messages under hostile input, without a socket: `/ws`'s `start`
(api/routes/ws.py) and a realtime `session.update` (api/realtime_protocol.updated). Whatever a client sends is
refused with the protocol's own error, or accepted as settings a turn can start with (`StreamOptions` builds) and
that the server can echo back as JSON in UTF-8; never another exception. Hypothesis builds messages from the
protocols' fields, each value mostly of the right type and now and then anything. The sockets' paths are in
test_ws.py and test_realtime.py."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from halkspeech.api.live import ProtocolError, parse_object
from halkspeech.api.realtime_protocol import RealtimeError, SessionConfig, session_object, updated
from halkspeech.api.routes.ws import MAX_TEXT_CHARS, START_EXAMPLE, _validated
from halkspeech.errors import HalkSpeechError, InvalidRequest

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                    max_size=3), max_leaves=8)  # fmt: skip
LANGUAGES = st.sampled_from(["tr", "en", "Turkish", "english", "xx", "", "zh-TW"])
TEXT = st.text(max_size=40) | st.sampled_from(["\udc00", "Ankara, İzmir", "x" * 3000])


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's own kind of value 9 times in 10, else any JSON value (or a lone surrogate in a string)."""
    return st.integers(0, 9).flatmap(lambda n: valid if n else JSON | st.just("\ud800"))


def some_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with any subset of `fields` (each mostly right) and now and then an unknown one."""
    return st.fixed_dictionaries({}, optional={**{k: mostly(v) for k, v in fields.items()}, "extra_field": JSON})


START = some_of({
    "language": LANGUAGES | st.none(), "task": st.sampled_from(["transcribe", "translate", "summarize"]),
    "model": st.none() | st.text(max_size=20), "sample_rate": st.integers(0, 400_000),
    "partials": st.booleans(), "segment_silence_ms": st.none() | st.integers(0, 40_000), "vad": st.booleans(),
    "hotwords": st.none() | TEXT,
})  # fmt: skip


@FUZZ
@given(start=START, kind=st.sampled_from(["start", "start", "end", "stop", None]))
def test_any_ws_start_message_is_a_turns_options_or_a_protocol_error(start: dict[str, Any], kind: Any) -> None:
    message = {"type": kind, **start} if kind is not None else start
    try:
        text = json.dumps(message, ensure_ascii=True)  # lone surrogates travel as \\ud800 escapes
        data = parse_object(text, MAX_TEXT_CHARS, START_EXAMPLE)
        if data.get("type") != "start":
            return
        options = _validated(data).options()
        event("turn options built")
        assert options.sample_rate == data.get("sample_rate", 16_000)
    except HalkSpeechError as exc:
        assert isinstance(exc, (ProtocolError, InvalidRequest)) and str(exc), exc


TRANSCRIPTION = some_of({
    "model": st.sampled_from(["whisper-1", "gpt-4o-transcribe", "large-v3-turbo"]) | st.text(max_size=20),
    "language": LANGUAGES | st.none(), "prompt": st.none() | TEXT, "keywords": st.lists(TEXT, max_size=5),
})  # fmt: skip
DETECTION = st.none() | some_of({
    "type": st.sampled_from(["server_vad", "semantic_vad", "none"]), "threshold": st.floats(-1, 2),
    "prefix_padding_ms": st.integers(-10, 40_000), "silence_duration_ms": st.integers(-10, 40_000),
})  # fmt: skip
FORMAT = some_of({"type": st.sampled_from(["audio/pcm", "audio/pcmu"]), "rate": st.integers(0, 400_000)})
GA_SESSION = some_of({
    "type": st.sampled_from(["transcription", "realtime"]),
    "audio": some_of({"input": some_of({"format": FORMAT, "transcription": TRANSCRIPTION,
                                         "turn_detection": DETECTION})}),
})  # fmt: skip
BETA_SESSION = some_of({
    "input_audio_format": st.sampled_from(["pcm16", "g711_ulaw"]), "input_audio_transcription": TRANSCRIPTION,
    "turn_detection": DETECTION,
})  # fmt: skip


@FUZZ
@given(ga=GA_SESSION, beta=BETA_SESSION, form=st.sampled_from(["ga", "beta"]))
def test_any_session_update_is_usable_settings_or_a_realtime_error(
    ga: dict[str, Any], beta: dict[str, Any], form: Any
) -> None:
    session = ga if form == "ga" else beta
    try:
        # as the server reads it: a text message, parsed (lone surrogates are refused there)
        data = parse_object(json.dumps({"type": "session.update", "session": session}), 2**20, "{}")
        config = updated(SessionConfig(), data["session"], form)
    except (RealtimeError, ProtocolError) as exc:
        assert str(exc)
        return
    config.stream_options()  # a turn can start with what was accepted
    json.dumps(session_object(config, "sess_1", form, "large-v3-turbo")).encode("utf-8")  # and it echoes back
    event("accepted")
