"""The fused decode-step kernels (model/kernels.py) equal the PyTorch ops they replace, run in Triton's
interpreter on the CPU; on a GPU, bench/gpu_fused.py checks them again and times them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from halkspeech.model import kernels, whisper
from halkspeech.model.cache import KVCache
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _reference(x, w, b, ln, gelu, residual):
    h = F.layer_norm(x.float(), (x.shape[1],), ln[0].float(), ln[1].float()) if ln else x.float()
    y = F.linear(h, w.float(), None if b is None else b.float())
    y = F.gelu(y) if gelu else y
    return y + residual.float() if residual is not None else y


SHAPES = [(1, 40, 300), (3, 72, 64), (20, 24, 96)]  # (m, n, k)
TILINGS = [(16, 1), (16, 3), (1, 1), (1, 2)]  # (block_m, split_k)
# block_m 1 runs a program a row: 20 rows would show nothing 3 rows do not, at 30 s of the interpreter's time
LINEAR_CASES = [(*shape, *tiling) for shape in SHAPES for tiling in TILINGS if tiling[0] > 1 or shape[0] <= 3]


@pytest.mark.parametrize(("m", "n", "k", "block_m", "split_k"), LINEAR_CASES)
def test_linear_equals_layer_norm_gemm_and_epilogue(m: int, n: int, k: int, block_m: int, split_k: int) -> None:
    # shapes that are no multiple of the tiles, a mean far from zero (the LayerNorm's two passes), every option
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g) * 3 + 5
    w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    ln = (torch.randn(k, generator=g), torch.randn(k, generator=g))
    residual = torch.randn(m, n, generator=g)
    # block_m 1: one row per program, no tensor-core tile (the batch-1 configuration)
    config = kernels.LinearConfig(block_m=block_m, block_n=16, block_k=64, split_k=split_k)
    for options in ({}, {"ln": ln}, {"ln": ln, "gelu": True}, {"residual": residual}, {"ln": ln, "residual": residual}):
        for bias in (b, None):
            got = kernels.linear(x, w, bias, config=config, **options)
            want = _reference(x, w, bias, options.get("ln"), options.get("gelu", False), options.get("residual"))
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"{options.keys()} bias={bias is not None}")
    if split_k > 1:  # the workspace and the tile counts are left zero for the next call
        ws, count = kernels._workspaces[(x.device, "linear")]
        assert not ws.any() and not count.any()


def test_linear_half_precision_and_float32_output() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 128, generator=g).half(), (torch.randn(96, 128, generator=g) / 12).half()
    got = kernels.linear(x, w, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ w.float().T, atol=1e-3, rtol=1e-3)
    assert kernels.linear(x, w).dtype == torch.float16


def test_linear_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="row-major"):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="residual"):
        kernels.linear(torch.randn(2, 8), torch.randn(4, 8), residual=torch.randn(2, 5))


def test_linear_writes_keys_and_values_into_the_cache() -> None:
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 32, generator=g), torch.randn(48, 32, generator=g)
    cache, rows = torch.zeros(10, 32), torch.tensor([7, 0, 4])
    y = kernels.linear(x, w, kv=(cache, rows, 16), config=kernels.LinearConfig(16, 16, 32))
    torch.testing.assert_close(y, x @ w.T)
    torch.testing.assert_close(cache[rows], y[:, 16:])
    assert not cache[[1, 2, 3, 5, 6, 8, 9]].any()
    with pytest.raises(ValueError, match="kv cache"):
        kernels.linear(x, w, kv=(cache, rows, 8))


def test_step_inputs() -> None:
    tokens, positions = torch.tensor([3, 1, 0]), torch.tensor([0, 5, 2])
    embedding, positional = torch.randn(10, 40), torch.randn(16, 40)
    x, rows = kernels.step_inputs(tokens, positions, embedding, positional, n_ctx=16)
    torch.testing.assert_close(x, embedding[tokens] + positional[positions])
    assert rows.tolist() == [0, 16 + 5, 32 + 2]
    # an idle row past the context (advanced once more after its last token) stays at the last position: it
    # wrote the next slot's first cache row (48 = 3 * 16 + 0) and read past the positional embedding
    x, rows = kernels.step_inputs(tokens, torch.tensor([0, 5, 16]), embedding, positional, n_ctx=16)
    torch.testing.assert_close(x[2], embedding[0] + positional[15])
    assert rows.tolist() == [0, 16 + 5, 32 + 15]


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_equals_sdpa(splits: int) -> None:
    """Cross-attention (every key, split over programs) and self-attention (keys up to each row's position,
    read from the cache's [B, T, 2, H, Dh] layout) against SDPA with the equivalent mask."""
    g = torch.Generator().manual_seed(splits)
    b, h, n, dh = 3, 4, 150, 64
    q = torch.randn(b, 3 * h * dh, generator=g)[:, : h * dh].view(b, h, dh)  # a strided view, as in the step
    k, v = torch.randn(b, h, n, dh, generator=g), torch.randn(b, h, n, dh, generator=g)
    got = kernels.decode_attention(q, k, v, splits=splits, block_n=32)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0].reshape(b, h * dh)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    cache = torch.randn(b, 40, 2, h, dh, generator=g)
    keys, values = cache[:, :, 0].transpose(1, 2), cache[:, :, 1].transpose(1, 2)
    positions = torch.tensor([[0, 9], [17, 9], [39, 9]])[:, 0]  # a column view with stride 2, as SlotState's
    got = kernels.decode_attention(q, keys, values, lengths=positions, length_offset=1, splits=splits, block_n=16)
    hidden = torch.arange(40)[None, :] > positions[:, None]
    mask = torch.zeros(b, 1, 1, 40).masked_fill(hidden[:, None, None], float("-inf"))
    want = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)[:, :, 0].reshape(b, h * dh)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if splits > 1:
        assert not kernels._workspaces[(q.device, "attention")][1].any()
    # rows at or past the last position read the 40 keys there are, not beyond (an idle row past the context)
    past = kernels.decode_attention(q, keys, values, lengths=torch.tensor([40, 45, 39]), length_offset=1)
    every = F.scaled_dot_product_attention(q[:, :, None], keys, values)[:, :, 0].reshape(b, h * dh)
    torch.testing.assert_close(past, every, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused_max_batch", [4, 2])
def test_fused_decoder_step_equals_plain_step(
    tiny_en_weights: LoadedWeights, monkeypatch: pytest.MonkeyPatch, fused_max_batch: int
) -> None:
    """Real tiny.en weights: three steps of three slots after a prompt, the fused path against the plain one
    (with a maximum of 2, the step of 3 is the plain one with the Triton self-attention).
    For the interpreter's sake (minutes otherwise) the vocabulary is cut to its first 1,024 tokens, the audio
    to 200 frames, and the tiles are large; the wiring tested depends on none of these (the tilings and the
    split attention have their own tests above), nor on the cross-attention's 16 splits, cut to 2 here (with 16,
    its 1,152 programs a step were most of the test's minute)."""
    monkeypatch.setattr(kernels, "linear_config", lambda m, n, k: kernels.LinearConfig(16, 128, 128))
    monkeypatch.setattr(whisper, "CROSS_SPLITS", 2)
    vocab, audio_ctx = 1024, 200
    dims = dataclasses.replace(tiny_en_weights.dims, n_vocab=vocab, n_audio_ctx=audio_ctx)
    state = dict(tiny_en_weights.state_dict)
    state["decoder.token_embedding.weight"] = state["decoder.token_embedding.weight"][:vocab]
    state["encoder.positional_embedding"] = state["encoder.positional_embedding"][:audio_ctx]
    model = Whisper.from_openai_state_dict(dims, state)

    def run(fused: bool) -> list[torch.Tensor]:
        cache = KVCache.allocate(dims, 4, dtype=torch.float32, device="cpu")
        audio = torch.randn(3, dims.n_audio_ctx, dims.n_audio_state, generator=torch.Generator().manual_seed(0))
        model.decoder.fused_max_batch = fused_max_batch if fused else 0
        out = []
        with torch.inference_mode():
            model.decoder.fill_cross(audio, cache, torch.arange(3))
            model.decoder.prefill(torch.tensor([[1, 2, 3]] * 3), cache, torch.arange(3))
            tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([3, 3, 3])
            for _ in range(3):
                logits = model.decoder.step(tokens, positions, cache, 16)
                out.append(logits)
                tokens, positions = logits.argmax(-1), positions + 1
        model.decoder.fused_max_batch = 0
        return out

    for plain, fused in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
        assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_fused_kernels_need_a_cuda_device() -> None:
    assert not kernels.available(torch.device("cpu"))


def test_dependent_launch_only_where_the_device_has_it() -> None:
    # PDL needs sm90+ and a compiled kernel: never in the interpreter nor on the CPU, and off when switched off
    assert kernels.launch_options(torch.device("cpu")) == {"PDL": False}
    kernels.set_pdl(False)
    try:
        assert kernels.launch_options(torch.device("cuda")) == {"PDL": False}
    finally:
        kernels.set_pdl(True)


@pytest.mark.parametrize(("m", "d", "rows"), [(1, 384, 4), (37, 300, 4), (9, 1280, 16)])
def test_layer_norm_with_a_shift_equals_torch(m: int, d: int, rows: int) -> None:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, d, generator=g) * 3 + 1
    shift = torch.randn(d, generator=g)
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    want = F.layer_norm(x + shift, (d,), weight, bias)
    torch.testing.assert_close(kernels.layer_norm(x, weight, bias, shift=shift, rows=rows), want)
    torch.testing.assert_close(kernels.layer_norm(x, weight, bias, rows=rows), F.layer_norm(x, (d,), weight, bias))
    with pytest.raises(ValueError):
        kernels.layer_norm(x, weight[1:], bias)


def test_fused_encoder_equals_plain_encoder(tiny_en_weights: LoadedWeights, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real tiny.en weights, the audio cut to 50 positions for the interpreter's sake (its LayerNorm runs a
    program a row): the residual stream kept without the projections' biases (added back by the LayerNorms)
    gives the plain encoder's output."""
    audio_ctx = 50
    dims = dataclasses.replace(tiny_en_weights.dims, n_audio_ctx=audio_ctx)
    state = dict(tiny_en_weights.state_dict)
    state["encoder.positional_embedding"] = state["encoder.positional_embedding"][:audio_ctx]
    model = Whisper.from_openai_state_dict(dims, state)
    mel = torch.randn(2, dims.n_mels, 2 * audio_ctx, generator=torch.Generator().manual_seed(0))
    assert not model.encoder.use_fused_kernels(True)  # on the CPU: the plain path
    with torch.inference_mode():
        plain = model.encoder(mel)
        monkeypatch.setattr(kernels, "available", lambda device: True)
        assert model.encoder.use_fused_kernels(True)
        fused = model.encoder(mel)
    assert model.encoder.shifts is not None and model.encoder.shifts.shape == (2 * dims.n_audio_layer + 1, 384)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
