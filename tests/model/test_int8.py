"""int8 weights on the CPU (model/int8.py): the projections stay close to float32, the whole model swaps every
projection and the logits, and an int8 engine transcribes the English dev clips about as well as float32."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jiwer
import pytest
import torch
from torch import nn
from whisper.normalizers import EnglishTextNormalizer

from halkspeech.audio import decode_audio, pad_or_trim
from halkspeech.audio.features import log_mel_windows
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import resolve_dtype, start_engine
from halkspeech.model.int8 import Int8Linear
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions

# Corpus WER of the 23 English dev clips, tiny.en, greedy: float32 0.037 (tests/test_accuracy.py); int8 measured
# 2026-12-05 in bench/results/accuracy_cpu_int8.json. The bound is float32's, so a broken int8 path fails it.
WER_BOUND = 0.06


@pytest.mark.parametrize(("rows", "bias"), [(1, True), (5, False), (300, True)])
def test_int8_linear_is_close_to_float(rows: int, bias: bool) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(384, 1536, bias=bias)
    x = torch.randn(rows, 384)
    exact, approx = linear(x), Int8Linear.of(linear)(x)
    assert approx.dtype == torch.float32 and approx.shape == exact.shape
    error = (approx - exact).norm() / exact.norm()
    assert error < 0.03, error  # 8-bit weights per row, 8-bit activations (7 without VNNI): 0.8-1.5% measured


def test_int8_linear_never_overflows_on_extreme_rows() -> None:
    """Rows that quantize to the ends of the range, against weights at ±127: where the kernel sums pairs of
    products in int16 (no VNNI), 8-bit activations would overflow; whichever width `_reduce_range` chose on this
    CPU must give the exact product to quantization error."""
    weight = torch.ones(4, 256)
    weight[1::2] = -1.0
    linear = nn.Linear(256, 4, bias=False)
    linear.weight.data = weight
    x = torch.cat([torch.ones(1, 256), -torch.ones(1, 256), torch.randn(2, 256)])
    assert torch.allclose(Int8Linear.of(linear)(x), x @ weight.T, rtol=0.02, atol=0.5)


@pytest.mark.parametrize(("instructions", "reduce"), [("AVX2", True), ("AVX512", True)])
def test_activations_take_7_bits_where_fbgemm_sums_pairs_in_int16(instructions: str, reduce: bool) -> None:
    """fbgemm's kernels of an older CPU, forced by its FBGEMM_ENABLE_INSTRUCTIONS: the overflow probe sees them
    and `_reduce_range` falls back to 7 bits (in a fresh process: the choice is made once a process)."""
    if torch.backends.quantized.engine not in ("fbgemm", "x86"):
        pytest.skip("fbgemm is not this build's quantized engine")
    code = "from halkspeech.model.int8 import _reduce_range; print(_reduce_range())"
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": instructions}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(reduce)


def test_int8_linear_rows_do_not_depend_on_the_rows_beside_them() -> None:
    torch.manual_seed(2)
    linear = Int8Linear.of(nn.Linear(384, 1536))
    gelu = torch.nn.functional.gelu(torch.randn(4, 384) * 3)  # one-sided rows, as the MLP's second projection sees
    batch = torch.cat([gelu, -gelu, torch.randn(3, 384)])
    together = linear(batch)
    for i in range(batch.shape[0]):  # each row alone: what a single sequence's decode step runs
        assert torch.equal(linear(batch[i : i + 1]), together[i : i + 1]), i
    assert torch.equal(linear(batch[:4]), together[:4])  # the one-sided rows without the others


def test_an_int8_window_encodes_the_same_whatever_is_batched_with_it(
    tiny_en_weights: LoadedWeights, jfk_path: Path
) -> None:
    """The engine encodes the windows of every request together: the others moved a window's encoding (by up
    to 3.4 here) and its transcript with it, where float32's stays exact."""
    w = tiny_en_weights
    model = Whisper.from_openai_state_dict(w.dims, w.state_dict)
    model.quantize_int8()
    audio = [decode_audio(jfk_path.with_name(name)) for name in ("jfk.flac", "LJ001-0002.wav", "test_de.wav")]
    mels = torch.stack([log_mel_windows(pad_or_trim(torch.from_numpy(a))[None], w.dims.n_mels)[0] for a in audio])
    with torch.no_grad():
        together = model.encoder(mels)
        for i in range(len(audio)):
            assert torch.equal(model.encoder(mels[i : i + 1]), together[i : i + 1]), i


def test_quantize_swaps_every_projection_and_the_logits(tiny_en_weights: LoadedWeights) -> None:
    w = tiny_en_weights
    model = Whisper.from_openai_state_dict(w.dims, w.state_dict)
    tokens = torch.tensor([[50257, 50362, 440, 2068]])
    float_logits = model.decoder.logits(model.decoder.token_embedding(tokens))
    model.quantize_int8()
    assert model.int8 and model.dtype == torch.float32  # lookups, LayerNorms and attention stay float32
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    assert not [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, Int8Linear) for b in blocks for m in b.modules()) == 4 * 4 + 4 * 6
    int8_logits = model.decoder.logits(model.decoder.token_embedding(tokens))
    assert (int8_logits - float_logits).norm() / float_logits.norm() < 0.03
    assert torch.equal(int8_logits.argmax(-1), float_logits.argmax(-1))
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        Whisper.from_openai_state_dict(w.dims, w.state_dict, dtype=torch.bfloat16).quantize_int8()


def test_int8_is_float16_on_a_gpu() -> None:
    assert resolve_dtype("int8", torch.device("cpu")) == torch.float32  # then quantized by start_engine
    assert resolve_dtype("int8", torch.device("cuda")) == torch.float16


def test_int8_engine_wer_on_the_english_dev_clips(
    tiny_en_weights: LoadedWeights, dev_clips: list[dict[str, Any]]
) -> None:
    clips = [c for c in dev_clips if c["language"] == "en" and c["text"]]
    assert len(clips) == 23
    audio = [decode_audio(c["path"]) for c in clips]
    model = start_engine(tiny_en_weights, EngineSettings(device="cpu", dtype="int8"))
    try:
        assert model.int8 and model.precision == "int8"
        transcriber = Transcriber(model)
        greedy = TranscribeOptions(temperatures=(0.0,))

        async def every_clip() -> list[str]:
            return [t.text for t in await asyncio.gather(*(transcriber.transcribe(a, greedy) for a in audio))]

        texts = asyncio.run(every_clip())
    finally:
        model.close()
    normalise = EnglishTextNormalizer()
    wer = jiwer.wer([normalise(c["text"]) for c in clips], [normalise(t) or "<empty>" for t in texts])
    assert wer < WER_BOUND, wer
    assert dataclasses.replace(model, int8=False).precision == "float32"
