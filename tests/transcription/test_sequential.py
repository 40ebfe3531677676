"""Sequential mode: silent windows are skipped undecoded, so silence never becomes invented words (and quiet
speech is not silence, in either mode); speech after a pause that the seek rule would skip is decoded; word
timings without timestamps add no text."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from whisper.normalizers import EnglishTextNormalizer

from conftest import TEST_DATA
from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions


def transcribe(model: ModelEngine, audio: np.ndarray) -> str:
    return asyncio.run(Transcriber(model).transcribe(audio, TranscribeOptions())).text


def test_long_silence_gives_empty_text(tiny_en_engine: ModelEngine) -> None:
    # 60 s of zeros decodes to " you you" in openai-whisper and in this engine without the silence gate
    assert transcribe(tiny_en_engine, np.zeros(60 * 16_000, np.float32)) == ""
    dither = np.random.default_rng(0).integers(-2, 3, 30 * 16_000).astype(np.float32) / 32768  # ±2 16-bit steps
    assert transcribe(tiny_en_engine, dither) == ""  # skipped undecoded
    hum = (np.random.default_rng(0).standard_normal(30 * 16_000) * 1e-4).astype(np.float32)
    assert transcribe(tiny_en_engine, hum) == ""  # decoded: the no-speech check drops it


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_quiet_speech_is_transcribed(tiny_en_engine: ModelEngine, jfk_path: Path, mode: str) -> None:
    """Speech peaking at -61 dBFS: the log-mel is normalised to its loudest part, so Whisper hears it (as
    openai-whisper does). Sequential mode's silence gate (then at -60 dBFS) skipped it undecoded, and batched
    mode's VAD heard no speech in it: both transcripts were empty."""
    speech = decode_audio(jfk_path)
    quiet = (speech / np.abs(speech).max() * 9e-4).astype(np.float32)
    text = asyncio.run(Transcriber(tiny_en_engine).transcribe(quiet, TranscribeOptions(mode=mode))).text
    assert "ask not what your country can do for you" in text.lower()


def test_speech_followed_by_silence_has_no_invented_tail(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    speech = decode_audio(jfk_path)
    text = transcribe(tiny_en_engine, np.concatenate([speech, np.zeros(40 * 16_000, np.float32)]))
    # the last window is 30 s of zeros: skipped, so the text ends where the speech does (no " you")
    assert text.rstrip(" .").endswith("what you can do for your country")


def test_word_timestamps_without_timestamps_add_no_text(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    """Without timestamps a window is one segment, taken whole; word timings must not move the seek back to the
    last word's end. openai-whisper and faster-whisper do (their rule for an unfinished last segment: no
    timestamp ends the window, which is always so without them): tiny.en then decoded jfk.flac's last 0.5 s
    again and wrote " Thank you. Thank you. Yeah. Yeah." after it (in both), and " So, this" after
    LJ001-0002.wav (as openai-whisper)."""
    for path, last in ((jfk_path, " country."), (TEST_DATA / "LJ001-0002.wav", " modern.")):
        speech = decode_audio(path)
        plain = TranscribeOptions(without_timestamps=True)
        words = TranscribeOptions(without_timestamps=True, word_timestamps=True)
        expected = asyncio.run(Transcriber(tiny_en_engine).transcribe(speech, plain)).text
        result = asyncio.run(Transcriber(tiny_en_engine).transcribe(speech, words))
        assert result.text == expected, path.name
        assert result.words and result.words[-1].word == last, (path.name, result.words[-3:])
        assert 0 < result.words[-1].end <= result.duration, (path.name, result.words[-1])


def test_prompts_that_spell_special_tokens_are_plain_text(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    # a client's prompt or prefix is text: "<|endoftext|>" in it must neither raise (tiktoken refuses special
    # tokens by default) nor end the prompt early, in either long-form mode
    tok = tiny_en_engine.tokenizer
    assert tok.eot not in tok.encode(" <|endoftext|><|en|>")
    assert tok.decode(tok.encode(" <|endoftext|><|0.00|>")) == " <|endoftext|><|0.00|>"
    speech = decode_audio(jfk_path)
    for mode in ("sequential", "batched"):
        options = TranscribeOptions(initial_prompt="<|endoftext|> <|startoftranscript|><|en|>", mode=mode)
        text = asyncio.run(Transcriber(tiny_en_engine).transcribe(speech, options)).text
        assert "ask not what your country can do for you" in text.lower(), (mode, text)
    # a prefix of the same kind decodes (to whatever tiny.en makes of it: here nothing) instead of raising
    options = TranscribeOptions(prefix="<|notimestamps|> And so")
    assert isinstance(asyncio.run(Transcriber(tiny_en_engine).transcribe(speech, options)).text, str)


def test_times_end_at_the_audio_end(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    # jfk cut mid-sentence: tiny.en's last timestamp lands in the window's padding (sequential mode, as in
    # openai-whisper, gave 9.54 s for 9.5 s of audio and 10.34 for 10.3); every time now stays inside the audio
    speech = decode_audio(jfk_path)
    for cut in (9.5, 10.3):
        for mode in ("sequential", "batched"):
            for words in (False, True):
                options = TranscribeOptions(mode=mode, word_timestamps=words)
                result = asyncio.run(Transcriber(tiny_en_engine).transcribe(speech[: int(cut * 16_000)], options))
                assert result.segments, (cut, mode)
                spans = [(s.start, s.end) for s in result.segments] + [(w.start, w.end) for w in result.words]
                assert all(0 <= a <= b <= result.duration for a, b in spans), (cut, mode, words, spans)


def test_speech_after_a_pause_the_seek_rule_skipped_is_decoded(tiny_en_engine: ModelEngine, jfk_path: Path) -> None:
    """HE COULD WAIT NO LONGER, 1 s of digital silence, then jfk.flac (14.1 s, one window): tiny.en wrote
    `<|0.00|> He could wait no longer.<|2.00|>` and ended; the reference's seek rule then takes the whole
    window, and jfk's 11 s were never decoded. The VAD hears them after the segment's end: the seek goes there."""
    first = decode_audio(TEST_DATA / "1089-134691-0000.flac")  # 2.1 s
    audio = np.concatenate([first, np.zeros(16_000, np.float32), decode_audio(jfk_path)])
    transcript = asyncio.run(Transcriber(tiny_en_engine).transcribe(audio, TranscribeOptions()))
    text = EnglishTextNormalizer()(transcript.text)
    assert text.startswith("he could wait no longer")
    assert text.endswith("ask not what your country can do for you ask what you can do for your country")
    later = [s for s in transcript.segments if "americans" in s.text.lower()]
    assert later and later[0].start > len(first) / 16_000 + 0.5  # at jfk, not at the first sentence's end
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts) and all(0 <= s.start <= s.end <= transcript.duration for s in transcript.segments)
