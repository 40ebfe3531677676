"""WindowDecoder's prompt: faster-whisper's `hotwords` lead every window's prompt (before the text so far),
within the half of the context a prompt may hold, and a prefix turns them off, as there."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import DEV_DIR
from halkspeech.audio import decode_audio, log_mel_spectrogram, pad_or_trim
from halkspeech.engine.factory import ModelEngine
from halkspeech.engine.request import DecodeRequest
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions
from halkspeech.transcription.window import WindowDecoder

HOTWORDS_CLIP = DEV_DIR / "faster-whisper-tests" / "hotwords.mp3"  # faster-whisper's own hotwords test clip


def test_hotwords_come_first_and_the_latest_text_fills_the_rest(tiny_en_engine: ModelEngine) -> None:
    tok = tiny_en_engine.tokenizer
    decoder = WindowDecoder(tiny_en_engine, TranscribeOptions(hotwords="  ComfyUI "))
    hot = tok.encode(" ComfyUI")
    assert decoder.with_hotwords([]) == hot
    previous = list(range(1000, 1300))  # 300 tokens of earlier text: more than a prompt holds
    prompt = decoder.with_hotwords(previous)
    assert len(prompt) == 223 and prompt[: len(hot)] == hot and prompt[len(hot) :] == previous[-(223 - len(hot)) :]
    huge = WindowDecoder(tiny_en_engine, TranscribeOptions(hotwords="word " * 400))
    assert len(huge.with_hotwords(previous)) == 223  # hotwords alone fill it; the context never overflows


def test_a_prefix_turns_hotwords_off(
    tiny_en_engine: ModelEngine, jfk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[DecodeRequest] = []
    decode = tiny_en_engine.engine.decode

    async def capture(request: DecodeRequest, *args: Any) -> Any:
        sent.append(request)
        return await decode(request, *args)

    monkeypatch.setattr(tiny_en_engine.engine, "decode", capture)
    tok = tiny_en_engine.tokenizer
    mel = pad_or_trim(log_mel_spectrogram(decode_audio(jfk_path), 80, padding=480_000)[:, :3000], 3000)
    for prefix, expected in ((None, [tok.sot_prev, *tok.encode(" Kennedy")]), ("And so", [])):
        options = TranscribeOptions(hotwords="Kennedy", prefix=prefix, temperatures=(0.0,))
        asyncio.run(WindowDecoder(tiny_en_engine, options).decode(mel, "en", []))
        assert list(sent[-1].prompt[: sent[-1].sot_index]) == expected


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_hotwords_spell_a_term_the_model_does_not_know(tiny_en_engine: ModelEngine, mode: str) -> None:
    if not HOTWORDS_CLIP.exists():
        pytest.skip("../shared/data/dev is not beside this checkout")
    audio = decode_audio(HOTWORDS_CLIP)
    plain, hinted = (
        asyncio.run(Transcriber(tiny_en_engine).transcribe(audio, TranscribeOptions(hotwords=h, mode=mode))).text
        for h in (None, "ComfyUI")
    )
    assert "comfyui" not in plain.lower()  # tiny.en hears "comfy eye"
    assert hinted.lower().count("comfyui") == 2, hinted  # "into your ComfyUI folder again in the ComfyUI"


def test_hotwords_are_tokenized_once_per_transcription(
    tiny_en_engine: ModelEngine, jfk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not once per window: a window's decode runs on the event loop, and 1 MB of hotwords took 0.1-0.25 s
    to tokenize, every window of a long file."""
    calls: list[str] = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: calls.append(text) or encode(self, text))
    mel = pad_or_trim(log_mel_spectrogram(decode_audio(jfk_path), 80, padding=480_000)[:, :3000], 3000)
    decoder = WindowDecoder(tiny_en_engine, TranscribeOptions(hotwords="Kennedy", temperatures=(0.0,)))
    for _ in range(2):
        asyncio.run(decoder.decode(mel, "en", []))
    assert calls.count(" Kennedy") == 1, calls
