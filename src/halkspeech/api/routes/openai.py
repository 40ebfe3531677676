"""OpenAI's audio API: POST /v1/audio/transcriptions and /v1/audio/translations (the real `openai` client
works against them unchanged). The routes only parse the form and shape the answer; jobs.py runs the work."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from halkspeech.api.deps import StateDep
from halkspeech.api.jobs import Job, Outcome, transcribe, with_server_policy
from halkspeech.api.schemas import AUDIO_ERRORS, TranscriptionForm, VerboseTranscriptionOut
from halkspeech.api.sse import stream
from halkspeech.errors import InvalidRequest
from halkspeech.model.tokenizer import Task
from halkspeech.transcription.formats import as_json, as_srt, as_verbose_json, as_vtt
from halkspeech.transcription.types import DEFAULT_TEMPERATURES, TranscribeOptions

router = APIRouter(prefix="/v1/audio", tags=["OpenAI audio API"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": VerboseTranscriptionOut,
        "description": "json ({text}), verbose_json (below), text/srt/vtt (text/plain), or with stream=true "
        "text/event-stream of transcript.text.delta events and one transcript.text.done",
        "content": {"text/plain": {"schema": {"type": "string"}}, "text/event-stream": {"schema": {"type": "string"}}},
    },
    **AUDIO_ERRORS,
}


# The form holds an UploadFile, which FastAPI does not look for inside a model: without the media type it would
# document the body as application/x-www-form-urlencoded (parsing is the same either way).
MultipartForm = Annotated[TranscriptionForm, Form(media_type="multipart/form-data")]


@router.post("/transcriptions", response_model=None, responses=_RESPONSES, summary="Transcribe audio")
async def transcriptions(request: Request, state: StateDep, form: MultipartForm) -> Response:
    return await _run(request, state, form, "transcribe")


@router.post("/translations", response_model=None, responses=_RESPONSES, summary="Translate audio into English")
async def translations(request: Request, state: StateDep, form: MultipartForm) -> Response:
    return await _run(request, state, form, "translate")


def options_from(form: TranscriptionForm, task: Task) -> TranscribeOptions:
    if "word" in form.timestamp_granularities and form.response_format != "verbose_json":
        # as OpenAI answers (400): the words would be computed and not returned
        raise InvalidRequest(
            "timestamp_granularities[]=word needs response_format=verbose_json", param="timestamp_granularities[]"
        )
    words = form.word_timestamps or ("word" in form.timestamp_granularities and form.response_format == "verbose_json")
    return TranscribeOptions(
        language=form.language or None,
        task=task,
        # OpenAI: "if set to 0, the model will ... automatically increase the temperature until certain thresholds"
        temperatures=DEFAULT_TEMPERATURES if form.temperature == 0 else (form.temperature,),
        beam_size=form.beam_size,
        best_of=form.best_of,
        initial_prompt=form.prompt or None,
        hotwords=form.hotwords or None,
        condition_on_previous_text=form.condition_on_previous_text,
        without_timestamps=form.without_timestamps,
        word_timestamps=words,
        mode=form.mode,
        vad_filter=form.vad_filter,
    )


async def _run(request: Request, state: StateDep, form: TranscriptionForm, task: Task) -> Response:
    options = with_server_policy(options_from(form, task), state.settings.server)
    job = Job(options=options, model=form.model, audio=form.file.file)
    if form.stream:
        return await stream(request, state, job, _done_event)
    outcome = await transcribe(request, state, job)
    return render(outcome, form, task)


def _done_event(outcome: Outcome) -> dict[str, Any]:
    return {"type": "transcript.text.done", "text": outcome.transcript.text.strip()}


def render(outcome: Outcome, form: TranscriptionForm, task: str) -> Response:
    transcript = outcome.transcript
    fmt = form.response_format
    # OpenAI's `usage` for models billed by the audio's length (whisper-1's), which SDKs read as Transcription.usage
    usage = {"usage": {"type": "duration", "seconds": round(transcript.duration, 3)}}
    if fmt == "json":
        return JSONResponse(as_json(transcript) | usage)
    if fmt == "verbose_json":
        granularities = set(form.timestamp_granularities)
        words = "word" in granularities or form.word_timestamps
        # as OpenAI's: words alone asked for leave the segments out
        segments = granularities != {"word"}
        return JSONResponse(as_verbose_json(transcript, task=task, words=words, segments=segments) | usage)
    text = {"text": transcript.text.strip() + "\n", "srt": as_srt(transcript), "vtt": as_vtt(transcript)}[fmt]
    return PlainTextResponse(text)
