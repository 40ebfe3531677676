"""The simple API of the FastAPI and Modal services HalkSpeech replaces:
`POST /transcribe?language=tr&task=transcribe&timestamps=true&timings=true` with a multipart `file`, and
`POST /transcribe/url` with the same options and a `url` in a JSON body."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from halkspeech.api.deps import StateDep
from halkspeech.api.jobs import Job, Outcome, transcribe, with_server_policy
from halkspeech.api.schemas import SIMPLE_ERRORS, SimpleOptions, SimpleTranscription, TranscribeURLRequest
from halkspeech.api.sse import stream
from halkspeech.transcription.types import Segment, TranscribeOptions

router = APIRouter(tags=["Simple API"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": SimpleTranscription,
        "description": "the transcript; with stream=true, text/event-stream of transcript.text.delta events and a "
        "final transcript.text.done carrying this object's fields",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **SIMPLE_ERRORS,
}


@router.post("/transcribe", response_model=None, responses=_RESPONSES, summary="Transcribe an uploaded file")
async def transcribe_file(
    request: Request,
    state: StateDep,
    file: Annotated[UploadFile, File(description="the audio (or video): any format FFmpeg reads")],
    query: Annotated[SimpleOptions, Query()],
) -> Response:
    job = Job(options=_options(query, state), model=query.model, audio=file.file)
    return await _answer(request, state, job, query)


@router.post("/transcribe/url", response_model=None, responses=_RESPONSES, summary="Transcribe audio at a URL")
async def transcribe_url(request: Request, state: StateDep, body: TranscribeURLRequest) -> Response:
    job = Job(options=_options(body, state), model=body.model, url=body.url)
    return await _answer(request, state, job, body)


def _options(query: SimpleOptions, state: StateDep) -> TranscribeOptions:
    options = TranscribeOptions(
        language=query.language or None,
        task=query.task,
        # No timestamps unless asked (the earlier service's default, and a little faster): one segment a window.
        without_timestamps=not (query.timestamps or query.word_timestamps),
        word_timestamps=query.word_timestamps,
        mode=query.mode,
        vad_filter=query.vad_filter,
    )
    return with_server_policy(options, state.settings.server)


async def _answer(request: Request, state: StateDep, job: Job, query: SimpleOptions) -> Response:
    if query.stream:
        return await stream(request, state, job, lambda o: {"type": "transcript.text.done", **body(o, query)})
    return JSONResponse(body(await transcribe(request, state, job), query))


def body(outcome: Outcome, query: SimpleOptions) -> dict[str, Any]:
    t = outcome.transcript
    result: dict[str, Any] = {
        "text": t.text.strip(),
        "language": t.language,
        "duration": round(t.duration, 3),
        "processing_time": round(outcome.processing_s, 3),
        "model": outcome.model,
    }
    if query.include_segments or query.timestamps or query.word_timestamps:
        result["segments"] = [_segment(s, words=query.word_timestamps) for s in t.segments]
    if query.timings:
        result["timings_ms"] = {
            "decode": round(outcome.decode_ms, 1),
            "queue": round(t.timings.queue, 1),
            "encoder": round(t.timings.encoder, 1),
            "decoder": round(t.timings.decoder, 1),
            "total": round(t.timings.total, 1),
        }
    return result


def _segment(segment: Segment, *, words: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": segment.id,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text.strip(),
    }
    if words:
        out["words"] = [
            {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability} for w in segment.words or ()
        ]
    return out
