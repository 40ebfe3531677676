"""Batched Silero VAD against silero's own streaming model, speech regions, and chunks of at most 30 s cut in
pauses; silence gives no chunks and an empty transcript."""

from __future__ import annotations

import asyncio
import warnings
from importlib import resources
from itertools import pairwise

import numpy as np
import pytest
import torch

from conftest import DEV_DIR, TEST_DATA
from halkspeech.audio import decode_audio
from halkspeech.audio.vad import FRAME, FRAME_S, SpeechDetector, VadOptions, raised_for_vad, speech_regions
from halkspeech.engine.factory import ModelEngine
from halkspeech.transcription.chunking import make_chunks, split_region
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

CONCAT = DEV_DIR / "longform" / "ljspeech_LJ001-0001_0008_concat.wav"


def streaming_probabilities(audio: np.ndarray) -> np.ndarray:
    """silero-vad's JIT model one frame at a time, as its get_speech_timestamps runs it."""
    path = resources.files("silero_vad.data").joinpath("silero_vad.jit")
    with resources.as_file(path) as file, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: the package ships TorchScript
        model = torch.jit.load(str(file), map_location="cpu")
    model.reset_states()
    x = torch.from_numpy(np.pad(audio, (0, -len(audio) % FRAME)))
    with torch.inference_mode():
        return np.array([model(frame, 16000).item() for frame in x.split(FRAME)], dtype=np.float32)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return decode_audio(TEST_DATA / "1089-134691-0000.flac")[: 16000 * 3]


def test_one_row_is_silero_streaming_model(speech: np.ndarray) -> None:
    ours = SpeechDetector(row_frames=10_000, warmup_frames=0).probabilities(speech)
    reference = streaming_probabilities(speech)
    assert ours.shape == reference.shape == (len(speech) // FRAME + (len(speech) % FRAME > 0),)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_rows_with_warmup_agree_with_streaming_model(speech: np.ndarray) -> None:
    # 16 frames per row: many independent rows (each warmed up on the 8 frames before it)
    ours = SpeechDetector(row_frames=16, warmup_frames=8).probabilities(speech)
    reference = streaming_probabilities(speech)
    assert np.mean(np.abs(ours - reference)) < 0.05
    assert np.mean((ours >= 0.5) == (reference >= 0.5)) >= 0.9


def test_silence_has_no_regions_and_no_chunks() -> None:
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(16000 * 20) * 1e-4).astype(np.float32)  # 20 s of faint noise
    probs = SpeechDetector().probabilities(quiet)
    assert probs.max() < 0.5
    assert speech_regions(probs, 20.0) == []
    assert make_chunks([], probs) == []


def test_quiet_recordings_are_raised_for_the_vad(speech: np.ndarray) -> None:
    """silero's probabilities follow the level: at -61 dBFS it heard no speech in speech."""
    quiet = (speech / np.abs(speech).max() * 9e-4).astype(np.float32)
    detector = SpeechDetector()
    assert not speech_regions(detector.probabilities(quiet), len(quiet) / 16_000)
    raised = raised_for_vad(quiet)
    assert np.abs(raised).max() == pytest.approx(0.09, rel=1e-3)  # +40 dB at most
    assert speech_regions(detector.probabilities(raised), len(quiet) / 16_000)
    assert raised_for_vad(speech) is speech and raised_for_vad(np.zeros(10, np.float32)).max() == 0


def test_a_click_or_an_offset_does_not_hide_quiet_speech(speech: np.ndarray) -> None:
    """The gain followed the loudest sample: one click before speech at -45 dBFS left half of it unheard,
    and under a 0.3 DC offset speech at -42 dBFS was not heard at all."""
    quiet = (speech / np.abs(speech).max() * 0.0056).astype(np.float32)  # -45 dBFS
    clicked = quiet.copy()
    clicked[8000:8040] = 0.3  # a 2.5 ms click
    offset = (quiet * 1.4 + 0.3).astype(np.float32)
    detector, seconds = SpeechDetector(), len(quiet) / 16_000

    def heard(audio: np.ndarray) -> float:
        return sum(end - start for start, end in speech_regions(detector.probabilities(raised_for_vad(audio)), seconds))

    alone = heard(quiet)
    assert alone > 0.5 * seconds
    assert heard(clicked) >= 0.9 * alone and heard(offset) >= 0.9 * alone
    assert np.abs(raised_for_vad(clicked)).max() <= 1.0


def test_regions_find_speech_between_silences(speech: np.ndarray) -> None:
    gap = np.zeros(16000 * 4, dtype=np.float32)
    audio = np.concatenate([gap, speech, gap])
    duration = len(audio) / 16000
    regions = speech_regions(SpeechDetector().probabilities(audio), duration, VadOptions(pad_s=0.2))
    assert len(regions) >= 1
    end = 4 + len(speech) / 16000
    assert 3.0 < regions[0][0] < 4.5  # speech starts at 4 s (minus the padding)
    assert end - 0.5 < regions[-1][1] < end + 0.5
    assert all(0 <= s < e <= duration for s, e in regions)


def test_long_region_is_cut_at_its_quietest_frames() -> None:
    # 70 s of "speech" with short dips at 20 s, 24 s, 50 s: cuts land on the deepest dip in each search span
    frames = int(70 / FRAME_S)
    probs = np.full(frames, 0.9, dtype=np.float32)
    for at, depth in ((20.0, 0.3), (24.0, 0.1), (50.0, 0.2)):
        probs[int(at / FRAME_S) : int(at / FRAME_S) + 3] = depth
    pieces = split_region(0.0, 70.0, probs)
    assert [round(s) for s, _ in pieces] == [0, 24, 50]
    assert pieces[-1][1] == 70.0
    assert all(e - s <= 30.0 for s, e in pieces)
    for _, cut in pieces[:-1]:
        assert probs[int(cut / FRAME_S)] <= 0.2


def test_chunks_of_real_speech_stay_within_30s_and_cut_in_pauses() -> None:
    if not CONCAT.exists():
        pytest.skip("dev set absent")
    audio = decode_audio(CONCAT)  # 52 s of read speech with short pauses: one VAD region
    duration = len(audio) / 16000
    probs = SpeechDetector().probabilities(audio)
    regions = speech_regions(probs, duration)
    chunks = make_chunks(regions, probs)
    assert max(e - s for s, e in regions) > 30  # the case the splitter is for
    assert len(chunks) >= 2
    assert all(0 < c.duration <= 30.0 for c in chunks)
    assert all(a.end <= b.start for a, b in pairwise(chunks))
    for a, b in pairwise(chunks):
        if a.end == b.start:  # cut inside a region: a pause, by the VAD
            assert probs[int(a.end / FRAME_S)] < 0.2


def test_silence_only_audio_gives_an_empty_transcript(tiny_en_engine: ModelEngine) -> None:
    seen: list[tuple[float, float]] = []
    silence = np.zeros(16000 * 45, dtype=np.float32)
    options = TranscribeOptions(language="en", mode="batched", word_timestamps=True)
    transcript = asyncio.run(
        Transcriber(tiny_en_engine).transcribe(silence, options, progress=lambda *p: seen.append(p))
    )
    assert transcript.text == "" and transcript.segments == ()
    assert transcript.duration == pytest.approx(45.0)
    assert seen == [(45.0, 45.0)]
