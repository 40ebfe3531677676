"""Word timings: the vectorised DTW and median filter equal openai-whisper's, and sequential mode's words agree
with the reference `transcribe(word_timestamps=True)` on the same weights (two English dev clips per source)."""

from __future__ import annotations

import asyncio
import difflib
from typing import Any

import numpy as np
import pytest
import torch
from whisper.model import ModelDimensions, Whisper
from whisper.timing import dtw_cpu
from whisper.timing import median_filter as reference_median_filter

from halkspeech.audio import decode_audio
from halkspeech.engine.factory import ModelEngine
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.alignment import WordTiming, dtw, median_filter, merge_punctuations
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

TOLERANCE_S = 0.2


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 30), (120, 750), (40, 1500)])
def test_dtw_path_equals_reference(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    rows, cols = dtw(x)
    expected = dtw_cpu(x.copy())
    np.testing.assert_array_equal(rows, expected[0])
    np.testing.assert_array_equal(cols, expected[1])


def test_dtw_breaks_ties_as_the_reference() -> None:
    # costs of 0, 1 and 2 only: many cells where two or three moves cost the same
    x = np.random.default_rng(3).integers(0, 3, (60, 400)).astype(np.float64)
    rows, cols = dtw(x)
    expected = dtw_cpu(x.copy())
    np.testing.assert_array_equal(rows, expected[0])
    np.testing.assert_array_equal(cols, expected[1])


# (4, 30, 200): one block of rows; (3, 50, 1500): a window's shape, 7 full blocks of rows and a partial one
@pytest.mark.parametrize("shape", [(4, 30, 200), (3, 50, 1500)])
@pytest.mark.parametrize("width", [7, 5])
def test_median_filter_equals_reference(width: int, shape: tuple[int, int, int]) -> None:
    x = torch.randn(*shape)
    np.testing.assert_array_equal(median_filter(x.numpy(), width), reference_median_filter(x, width).numpy())


def test_punctuation_joins_its_neighbours() -> None:
    words = [WordTiming(w, [i], i, i + 1, 1.0) for i, w in enumerate([" (", "Hello", ",", " world", "!", ")"])]
    merge_punctuations(words, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    assert [w.word for w in words if w.word] == [" (Hello,", " world!)"]
    assert sum(len(w.tokens) for w in words) == 6  # emptied entries keep nothing, tokens are not lost


def test_an_apostrophe_inside_a_word_keeps_it_whole() -> None:
    """Turkish suffixes after an apostrophe were words of their own ("'ya"), timed and highlighted apart."""
    tokenizer = Tokenizer(multilingual=True, num_languages=99)
    text = " Ankara'ya gittim, Türkiye'nin başkenti. Don't stop, O'Brien 'said'"
    words, groups = tokenizer.split_to_words(tokenizer.encode(text), "tr")
    assert "".join(words) == text and sum(map(len, groups)) == len(tokenizer.encode(text))
    assert [w for w in words if "'" in w] == [" Ankara'ya", " Türkiye'nin", " Don't", " O'Brien", " 'said'"]


def reference_model(weights: LoadedWeights) -> Whisper:
    model = Whisper(ModelDimensions(**weights.dims.as_dict()))
    model.load_state_dict(weights.state_dict)
    heads = torch.zeros(weights.dims.n_text_layer, weights.dims.n_text_head, dtype=torch.bool)
    for layer, head in weights.alignment_heads:
        heads[layer, head] = True
    model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return model.float().eval()


def matched_words(reference: list[dict[str, Any]], ours: Transcript) -> list[tuple[dict[str, Any], Any]]:
    """Pairs of the same word in both lists, matched in order by text."""
    theirs = [w["word"].strip().lower() for w in reference]
    mine = [w.word.strip().lower() for w in ours.words]
    pairs = []
    for block in difflib.SequenceMatcher(a=theirs, b=mine, autojunk=False).get_matching_blocks():
        pairs += [(reference[block.a + k], ours.words[block.b + k]) for k in range(block.size)]
    return pairs


def test_word_timings_agree_with_reference(
    tiny_en_weights: LoadedWeights, tiny_en_engine: ModelEngine, dev_clips: list[dict[str, Any]]
) -> None:
    by_source: dict[str, list[dict[str, Any]]] = {}
    for clip in dev_clips:
        if clip["language"] == "en" and clip["text"] and clip["duration"] < 20:
            by_source.setdefault(clip["audio"].split("/")[0], []).append(clip)
    clips = [c for group in by_source.values() for c in group[:2]]  # two per source: 11 clips, 95 s, 237 words
    audios = [decode_audio(c["path"]) for c in clips]
    options = TranscribeOptions(language="en", word_timestamps=True)

    async def ours_all() -> list[Transcript]:
        transcriber = Transcriber(tiny_en_engine)
        return list(await asyncio.gather(*(transcriber.transcribe(a, options) for a in audios)))

    ours = asyncio.run(ours_all())
    model = reference_model(tiny_en_weights)
    total = close = 0
    for audio, mine in zip(audios, ours, strict=True):
        result = model.transcribe(audio, language="en", word_timestamps=True, fp16=False)
        reference = [w for s in result["segments"] for w in s["words"]]
        assert all(s.words is not None for s in mine.segments)
        pairs = matched_words(reference, mine)
        assert len(pairs) >= 0.9 * len(reference)
        total += len(reference)
        close += sum(
            abs(r["start"] - w.start) <= TOLERANCE_S and abs(r["end"] - w.end) <= TOLERANCE_S for r, w in pairs
        )
    assert total > 200
    assert close / total >= 0.95, f"{close}/{total} words within {TOLERANCE_S} s"
