"""Transcript → text, json, verbose_json (OpenAI's shapes), srt, vtt."""

from __future__ import annotations

from typing import Any, Literal

from halkspeech.model.languages import LANGUAGES
from halkspeech.transcription.subtitles import SubtitleOptions, subtitle_cues
from halkspeech.transcription.types import Transcript

__all__ = ["FORMATS", "OutputFormat", "SubtitleOptions", "as_json", "as_srt", "as_verbose_json", "as_vtt", "timestamp"]

OutputFormat = Literal["text", "json", "verbose_json", "srt", "vtt"]
FORMATS: tuple[str, ...] = ("text", "json", "verbose_json", "srt", "vtt")


def timestamp(seconds: float, *, decimal: str = ".", always_hours: bool = True) -> str:
    """12.345 → 00:00:12.345 (srt uses a comma; vtt may drop the hours)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    head = f"{hours:02d}:" if always_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def as_json(transcript: Transcript) -> dict[str, Any]:
    return {"text": transcript.text.strip()}


def as_verbose_json(
    transcript: Transcript, *, task: str = "transcribe", words: bool = False, segments: bool = True
) -> dict[str, Any]:
    """OpenAI's verbose_json. Its top-level `words` are bare ("The", as OpenAI's); each segment's own `words`
    keep Whisper's leading space, as openai-whisper's and faster-whisper's do."""
    data: dict[str, Any] = {
        "task": task,
        # the output's language, as OpenAI's: a translation's is always English (its source language is not given)
        "language": "english" if task == "translate" else LANGUAGES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration, 3),
        "text": transcript.text.strip(),
    }
    if segments:
        data["segments"] = [s.as_dict() for s in transcript.segments]
    if words:
        data["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in transcript.words]
    return data


def as_srt(transcript: Transcript, options: SubtitleOptions = SubtitleOptions()) -> str:
    cues = []
    for i, cue in enumerate(subtitle_cues(transcript, options), start=1):
        cues.append(f"{i}\n{timestamp(cue.start, decimal=',')} --> {timestamp(cue.end, decimal=',')}\n{cue.text}\n")
    return "\n".join(cues)


def as_vtt(transcript: Transcript, options: SubtitleOptions = SubtitleOptions()) -> str:
    cues = ["WEBVTT\n"]
    for cue in subtitle_cues(transcript, options, escape=_vtt_escape):
        cues.append(f"{timestamp(cue.start)} --> {timestamp(cue.end)}\n{cue.text}\n")
    return "\n".join(cues)


def _vtt_escape(text: str) -> str:
    """WebVTT cue text: `&` and `<` as character references ("<5%" would be read as a tag and dropped; a `>`
    may stand as it is)."""
    return text.replace("&", "&amp;").replace("<", "&lt;")
