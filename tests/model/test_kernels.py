"""FP8 kernels: the PyTorch references against exact math, the Triton kernels (under Triton's CPU
interpreter) against the references, and the FP8 engine mode end to end on real weights."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from halkspeech.audio import decode_audio
from halkspeech.config import EngineSettings
from halkspeech.engine.factory import start_engine
from halkspeech.model.kernels.decode_attention import decode_attention_reference, quantize_heads
from halkspeech.model.kernels.quant import Prologue, quantize_rows_reference
from halkspeech.model.weights import LoadedWeights
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("prologue", list(Prologue))
def test_row_quantisation_keeps_values_within_e4m3_precision(prologue: Prologue) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 512, dtype=torch.bfloat16) * 3
    weight, bias = torch.randn(512), torch.randn(512)
    exact = x.float()
    if prologue == Prologue.LAYER_NORM:
        exact = F.layer_norm(exact, (512,), weight, bias)
    elif prologue == Prologue.BIAS_GELU:
        exact = F.gelu(exact + bias)
    x8, scale = quantize_rows_reference(x, prologue, weight, bias)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    assert rel_err(x8.float() * scale, exact) < 0.04  # 3 mantissa bits: about 2.6% on Gaussian data


def test_fp8_decode_attention_is_close_to_exact_attention() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 4, 64)
    k, v = torch.randn(3, 4, 300, 64), torch.randn(3, 4, 300, 64)
    exact = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    out = decode_attention_reference(q, *quantize_heads(k), *quantize_heads(v))
    assert rel_err(out, exact) < 0.06


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_references_in_the_interpreter() -> None:
    """Run in a subprocess: TRITON_INTERPRET must be set before triton is imported."""
    script = textwrap.dedent(
        """
        import torch
        from halkspeech.model.kernels.decode_attention import (
            decode_attention, decode_attention_reference, quantize_heads)
        from halkspeech.model.kernels.quant import Prologue, quantize_rows, quantize_rows_reference
        torch.manual_seed(0)
        for batch, keys in ((1, 1500), (4, 700), (16, 100)):  # split and unsplit launches
            q = torch.randn(batch, 8, 64, dtype=torch.float16)
            k8, ks = quantize_heads(torch.randn(batch, 8, keys, 64))
            v8, vs = quantize_heads(torch.randn(batch, 8, keys, 64))
            out, ref = decode_attention(q, k8, ks, v8, vs), decode_attention_reference(q, k8, ks, v8, vs)
            assert (out.float() - ref.float()).abs().max() < 1e-3, (batch, keys)
        x = torch.randn(16, 300, dtype=torch.bfloat16)
        w, b = torch.randn(300), torch.randn(300)
        for prologue in Prologue:
            _, scale = quantize_rows(x, prologue, w, b)
            _, expected = quantize_rows_reference(x, prologue, w, b)
            # scales are computed after the prologue, so they check its math; the e4m3 codes themselves are
            # checked on a GPU (Triton's interpreter mis-rounds float32 -> e4m3 near powers of two)
            assert torch.allclose(scale, expected, rtol=1e-5), prologue
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fp8_mode_transcribes_like_full_precision(tiny_en_weights: LoadedWeights, jfk_path: object) -> None:
    audio = decode_audio(jfk_path)  # type: ignore[arg-type]
    options = TranscribeOptions(temperatures=(0.0,))
    texts = []
    for fp8 in (False, True):
        model = start_engine(tiny_en_weights, EngineSettings(device="cpu", fp8=fp8, max_slots=2))
        try:
            model.engine.runner.fp8_min_batch = 1  # exercise the FP8 encoder on a single window too
            assert (model.engine.runner.cache.cross_k.dtype == torch.float8_e4m3fn) == fp8
            texts.append(asyncio.run(Transcriber(model).transcribe(audio, options)).text)
        finally:
            model.close()
    assert texts[0] == texts[1]
    assert "ask not what your country can do for you" in texts[1]
