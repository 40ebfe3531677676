"""The model-free pieces of live.py that the OpenAI Realtime adapter uses: append-only text (transcription
deltas), the VAD threshold, and the options that carry them."""

from __future__ import annotations

import numpy as np
import pytest

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.live import AppendOnlyText, Segmenter, StablePrefix, StreamOptions


def test_fragments_are_the_growth_of_stable_text_and_end_with_the_final() -> None:
    text = AppendOnlyText()
    assert [text.grow(s) for s in ["", "And so", "And so", "And so my fellow"]] == ["", "And so", "", " my fellow"]
    fragment, whole = text.finish("And so my fellow Americans, ask not.")
    assert (fragment, whole) == (" Americans, ask not.", "And so my fellow Americans, ask not.")


def test_a_final_that_revised_streamed_words_goes_on_after_them() -> None:
    """What was sent stays; the whole text takes the final's words after those that stand for the sent ones
    (a comma inside them, a reworded one), so the fragments always add up to it."""
    for sent, final, whole in [
        ("And so my fellow", "And so, my fellow Americans.", "And so my fellow Americans."),
        ("stuff it into", "stuffered into you", "stuff it into you"),
        ("thick peppered flower", "thick peppered flower-fattened sauce.", "thick peppered flower-fattened sauce."),
        ("Hello", "", "Hello"),
    ]:
        text = AppendOnlyText()
        text.grow(sent)
        fragment, got = text.finish(final)
        assert got == whole and sent + fragment == whole, (sent, final, got)


def test_text_without_spaces_goes_on_by_characters() -> None:
    text = AppendOnlyText()
    text.grow("今日は")
    assert text.finish("今日は、いい天気", "ja") == ("、いい天気", "今日は、いい天気")
    text = AppendOnlyText()
    text.grow("今日わ")
    assert text.finish("今日は、いい天気", "ja") == ("、いい天気", "今日わ、いい天気")


def test_fragments_from_partials_add_up_to_the_stable_text() -> None:
    stable, text, sent = StablePrefix(), AppendOnlyText(), ""
    hypotheses = ["and so my", "And so my fellow", "and so, my fellow Americans", "And so my fellow Americans ask"]
    for hypothesis in hypotheses:
        _, settled = stable.update(hypothesis)
        sent += text.grow(settled)
        assert sent == settled


def test_segmenter_threshold_keeps_silero_hysteresis_below_it() -> None:
    segmenter = Segmenter.at(pause_frames=2, threshold=0.8)
    assert (segmenter.threshold, segmenter.neg_threshold) == pytest.approx((0.8, 0.65))
    events = segmenter.push(np.array([0.7, 0.85, 0.66, 0.6, 0.6, 0.9]))  # 0.7 < 0.8: no start; 0.66 ≥ 0.65 goes on
    assert [(e.kind, e.sample // 512) for e in events] == [("speech", 1), ("pause", 3), ("speech", 5)]
    assert Segmenter.at(None, None) == Segmenter(None)


def test_options_refuse_a_threshold_or_padding_out_of_range() -> None:
    with pytest.raises(InvalidRequest, match="threshold"):
        StreamOptions(vad_threshold=1.5)
    with pytest.raises(InvalidRequest, match="prefix padding"):
        StreamOptions(preroll_ms=-1)
