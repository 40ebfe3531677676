"""Contract tests of the OpenAI audio API with the real `openai` client against a running server: every
response format, word timings, streaming, translation (base, German → English), the models endpoints and
OpenAI-shaped errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from api.conftest import LiveServer, api_settings, live_server
from conftest import DEV_DIR, JFK_TEXT, TEST_DATA, jfk_with_pauses, wav_bytes
from halkspeech.engine.factory import ModelEngine

LJ = TEST_DATA / "LJ001-0002.wav"  # "in being comparatively modern."
GERMAN = TEST_DATA / "test_de.wav"  # "Der hinter diesem Portal liegenden Raum wurde als Leichenhalle genutzt."


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def server(shared_tiny_en: ModelEngine) -> Iterator[LiveServer]:
    with live_server(api_settings(models=["base"]), shared_tiny_en) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_json(client: openai.OpenAI, jfk_path: Path) -> None:
    with jfk_path.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert words_of(result.text) == words_of(JFK_TEXT)
    assert result.usage is not None and result.usage.type == "duration"  # as whisper-1's: the audio's seconds
    assert result.usage.seconds == pytest.approx(11.0, abs=0.05)


def test_text_srt_vtt(client: openai.OpenAI) -> None:
    text = client.audio.transcriptions.create(model="tiny.en", file=LJ.open("rb"), response_format="text")
    assert isinstance(text, str) and words_of(text) == ["in", "being", "comparatively", "modern"]
    srt = client.audio.transcriptions.create(model="tiny.en", file=LJ.open("rb"), response_format="srt")
    assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n.*comparatively modern", srt)
    vtt = client.audio.transcriptions.create(model="tiny.en", file=LJ.open("rb"), response_format="vtt")
    assert vtt.startswith("WEBVTT") and re.search(r"00:00:\d\d\.\d{3} --> 00:00:\d\d\.\d{3}\n.*modern", vtt)


def test_verbose_json_with_words(client: openai.OpenAI, jfk_path: Path) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=jfk_path.open("rb"),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert result.language == "english" and result.duration == pytest.approx(11.0, abs=0.05)
    assert result.usage is not None and result.usage.seconds == result.duration
    assert words_of(result.text) == words_of(JFK_TEXT)
    assert result.segments and all(s.end > s.start for s in result.segments)
    assert words_of(" ".join(s.text for s in result.segments)) == words_of(JFK_TEXT)
    # the word granularity reaches the alignment pass: words cover the text, in order, inside the audio
    assert result.words
    assert words_of(" ".join(w.word for w in result.words)) == words_of(JFK_TEXT)
    assert all(w.word == w.word.strip() and w.word for w in result.words)  # "And", as OpenAI's, not " And"
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= result.duration + 0.5


def test_granularities_as_openai_answers_them(server: LiveServer) -> None:
    """`word` alone leaves the segments out; `word` with any format but verbose_json is a 400 (the words
    would be computed and never returned)."""

    def post(*granularities: str, response_format: str = "verbose_json") -> httpx.Response:
        form = {"response_format": response_format, "timestamp_granularities[]": list(granularities)}
        return httpx.post(
            f"{server.url}/v1/audio/transcriptions", data=form, files={"file": LJ.open("rb")}, timeout=120
        )

    alone = post("word").json()
    assert "segments" not in alone and words_of(" ".join(w["word"] for w in alone["words"])) == words_of(alone["text"])
    both = post("word", "segment").json()
    assert both["segments"] and both["words"]
    assert "words" not in post("segment").json() and post("segment", response_format="json").status_code == 200
    for response_format in ("json", "text", "srt"):
        refused = post("word", response_format=response_format)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "timestamp_granularities[]"


def test_streaming_deltas_then_done(client: openai.OpenAI, jfk_path: Path) -> None:
    stream = client.audio.transcriptions.create(model="whisper-1", file=jfk_path.open("rb"), stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) >= 3  # jfk is two segments: two deltas as they complete, then done
    deltas = "".join(e.delta for e in events[:-1])
    assert deltas == events[-1].text and words_of(deltas) == words_of(JFK_TEXT)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client marks translations so
def test_translation_german_to_english(client: openai.OpenAI) -> None:
    result = client.audio.translations.create(model="base", file=GERMAN.open("rb"), response_format="verbose_json")
    assert result.task == "translate" and result.language == "english"  # the output's language, as OpenAI's
    found = set(words_of(result.text))
    assert not found & {"der", "diesem", "liegenden", "raum", "wurde", "als", "genutzt"}, result.text
    assert found & {"the", "this", "was", "is", "used", "as", "room", "hall"}, result.text


def test_faster_whisper_hotwords(client: openai.OpenAI) -> None:
    clip = DEV_DIR / "faster-whisper-tests" / "hotwords.mp3"  # faster-whisper's own hotwords test clip
    if not clip.exists():
        pytest.skip("../shared/data/dev is not beside this checkout")
    result = client.audio.transcriptions.create(
        model="tiny.en", file=clip.open("rb"), extra_body={"hotwords": "ComfyUI"}
    )
    assert "ComfyUI" in result.text, result.text  # without: "comfy eye" (tests/transcription/test_window.py)


def test_faster_whisper_vad_filter(client: openai.OpenAI) -> None:
    """vad_filter=true: only the speech is transcribed (tiny.en writes "And so am I fellow" over the whole
    file), at the file's times; the duration stays the file's."""
    audio = wav_bytes(jfk_with_pauses())  # speech at 10-12.77 s and 20.77-29 s
    result = client.audio.transcriptions.create(
        model="tiny.en",
        file=("pauses.wav", audio),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        extra_body={"vad_filter": "true"},
    )
    assert words_of(result.text) == words_of(JFK_TEXT) and result.duration == pytest.approx(29.0)
    assert result.segments and result.segments[0].start >= 9.5 and result.segments[-1].end <= 29.0
    assert result.words and result.words[0].start >= 9.5
    ask = next(w for w in result.words if w.word.lower() == "ask")
    assert ask.start >= 20.3  # after the 8 s pause


def test_models_list_retrieve_load_unload(client: openai.OpenAI, server: LiveServer) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"tiny.en", "whisper-1"} <= ids
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    with pytest.raises(openai.NotFoundError, match="not loaded, configured or cached"):
        client.models.retrieve("no-such-model")
    never = httpx.get(f"{server.url}/v1/models/..%2Fetc%2Fpasswd", timeout=30)  # no POST would fetch it
    assert never.status_code == 404 and "'../etc/passwd' is not available here" in never.json()["error"]["message"]
    assert "POST" not in never.text
    loaded = httpx.post(f"{server.url}/v1/models/base", timeout=300)
    assert loaded.status_code == 200 and loaded.json()["loaded"] is True
    assert server.pool.is_loaded("base")
    assert client.models.delete("base").deleted is True
    assert not server.pool.is_loaded("base")
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.models.delete("base")
    long_id = httpx.delete(f"{server.url}/v1/models/{'x' * 5000}", timeout=30)
    assert long_id.status_code == 404 and "(5000 characters)" in long_id.text and len(long_id.text) < 400


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_errors_are_openai_shaped(client: openai.OpenAI, jfk_path: Path) -> None:
    with pytest.raises(openai.BadRequestError) as bad_format:
        client.audio.transcriptions.create(model="whisper-1", file=LJ.open("rb"), response_format="docx")  # type: ignore[call-overload]
    assert bad_format.value.body["param"] == "response_format"  # type: ignore[index]
    assert "'json', 'text', 'srt', 'verbose_json' or 'vtt'" in bad_format.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not audio"):
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"hello, this is text"))
    with pytest.raises(openai.NotFoundError, match="not available here"):
        client.audio.transcriptions.create(model="no-such-model", file=LJ.open("rb"))
    with pytest.raises(openai.BadRequestError, match="English-only and cannot translate"):
        client.audio.translations.create(model="tiny.en", file=LJ.open("rb"))
    with pytest.raises(openai.BadRequestError, match="unsupported language 'xx'") as bad_language:
        client.audio.transcriptions.create(model="whisper-1", file=LJ.open("rb"), language="xx")
    assert bad_language.value.body["param"] == "language"  # type: ignore[index]


def test_faster_whisper_server_model_ids_name_the_catalog_model(client: openai.OpenAI, server: LiveServer) -> None:
    """Systran/faster-whisper-tiny.en is the repo tiny.en comes from: the same engine, not a 404."""
    result = client.audio.transcriptions.create(model="Systran/faster-whisper-tiny.en", file=LJ.open("rb"))
    assert words_of(result.text) == words_of("in being comparatively modern.")
    assert "Systran/faster-whisper-tiny.en" not in {m.name for m in server.pool.loaded()}


def test_openapi_documents_the_multipart_upload_and_the_real_error_statuses(server: LiveServer) -> None:
    schema = server.app.openapi()
    components = schema["components"]["schemas"]
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert list(content) == ["multipart/form-data"], content  # not application/x-www-form-urlencoded
        form = components[content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
        assert "file" in form["required"]
        file = form["properties"]["file"]
        assert file["type"] == "string" and file.get("contentMediaType") == "application/octet-stream", file
        # validation errors are 400 here; no 422 of FastAPI's HTTPValidationError shape
        responses = operation["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert "HTTPValidationError" not in str(responses)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status != "200":  # every documented error has the error body the server sends
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    simple = schema["paths"]["/transcribe"]["post"]["responses"]
    assert {"400", "401", "404", "413", "422", "429", "504"} <= set(simple)
    assert "409" in schema["paths"]["/v1/models/{model_id}"]["delete"]["responses"]
    assert "HTTPValidationError" not in components and "ValidationError" not in components


def test_an_error_after_the_stream_started_is_an_openai_error_event(shared_tiny_en: ModelEngine) -> None:
    """A transcription that times out once its stream is open ends it with an error event carrying OpenAI's
    error object (message, type, param, code), as the 504 body would have."""
    with (
        live_server(api_settings(request_timeout_s=0.2), shared_tiny_en) as live,
        httpx.stream(
            "POST",
            f"{live.url}/v1/audio/transcriptions",
            files={"file": (TEST_DATA / "jfk.flac").read_bytes()},
            data={"stream": "true"},
            timeout=120,
        ) as response,
    ):
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line) for line in lines if line != "[DONE]"]
    assert events[-1]["type"] == "error", events
    error = events[-1]["error"]
    assert error == {"message": error["message"], "type": "server_error", "param": None, "code": "timeout"}
