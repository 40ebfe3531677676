"""The cross-attention over the audio itself (model/absorbed.py): the same decoder steps as over the keys and values,
on real tiny.en weights with the kernel's PyTorch stand-in; the cache keeping each slot's audio; the CUDA source
compiling for every Whisper width (where NVRTC is installed: the dev extras bring it)."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from halkspeech.model import absorbed, cuda_rtc
from halkspeech.model.cache import KVCache
from halkspeech.model.dims import KNOWN_DIMS
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper


def _steps(model: Whisper, min_batch: int, *, zero_audio: bool = False) -> list[torch.Tensor]:
    """Three steps of three slots after a prompt, with the audio path on from `min_batch` slots (0: off);
    zero_audio: the cache's copy of the audio is zeroed after the fill (the keys and values are not)."""
    dims = model.dims
    model.decoder.use_absorbed_cross(min_batch, reference=True)
    cache = KVCache.allocate(dims, 4, dtype=torch.float32, device="cpu", audio=True)
    audio = torch.randn(3, dims.n_audio_ctx, dims.n_audio_state, generator=torch.Generator().manual_seed(0))
    out = []
    with torch.inference_mode():
        model.decoder.fill_cross(audio, cache, torch.arange(3))
        if zero_audio:
            assert cache.cross_e is not None
            cache.cross_e.zero_()
        model.decoder.prefill(torch.tensor([[50257, 50362, 314]] * 3), cache, torch.arange(3))
        tokens, positions = torch.tensor([383, 1110, 318]), torch.tensor([3, 3, 3])
        for _ in range(3):
            logits = model.decoder.step(tokens, positions, cache, 16)
            out.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
    model.decoder.use_absorbed_cross(0)
    return out


def test_decoder_steps_over_the_audio_equal_steps_over_its_keys_and_values(tiny_en_weights: LoadedWeights) -> None:
    model = Whisper.from_openai_state_dict(tiny_en_weights.dims, tiny_en_weights.state_dict)
    plain = _steps(model, 0)
    for over_audio, over_keys in zip(_steps(model, 3), plain, strict=True):
        torch.testing.assert_close(over_audio, over_keys, atol=2e-4, rtol=1e-4)
        assert torch.equal(over_audio.argmax(-1), over_keys.argmax(-1))
    # the steps of 3 slots read the cache's audio (zeroed, their logits change), steps of fewer keep the keys
    assert not torch.allclose(_steps(model, 3, zero_audio=True)[0], plain[0], atol=1e-2)
    for below, over_keys in zip(_steps(model, 4, zero_audio=True), plain, strict=True):
        torch.testing.assert_close(below, over_keys)


def test_the_cache_keeps_each_slots_audio_through_copies() -> None:
    dims = KNOWN_DIMS["tiny.en"]
    cache = KVCache.allocate(dims, 3, dtype=torch.float32, device="cpu", audio=True)
    assert cache.cross_e is not None and cache.cross_e.shape == (3, dims.n_audio_ctx, dims.n_audio_state)
    audio = torch.randn(2, dims.n_audio_ctx, dims.n_audio_state)
    cache.store_audio(torch.tensor([0, 2]), audio)
    cache.copy_cross(2, 1)  # a beam takes its request's window
    assert torch.equal(cache.cross_e[1], audio[1])
    cache.move_slots([(0, 2)], 5)  # compaction
    assert torch.equal(cache.cross_e[2], audio[0])
    extra = KVCache.bytes_per_slot(dims, torch.float16, audio=True) - KVCache.bytes_per_slot(dims, torch.float16)
    assert extra == dims.n_audio_ctx * dims.n_audio_state * 2
    assert KVCache.allocate(dims, 1, dtype=torch.float32, device="cpu").cross_e is None


def test_the_kernel_runs_on_cuda_only() -> None:
    model = Whisper(KNOWN_DIMS["tiny.en"])
    assert not absorbed.supported(torch.device("cpu"), torch.float16, 384, 6)
    assert not model.decoder.use_absorbed_cross(32)
    assert model.decoder.absorbed is None and model.decoder.absorbed_min_batch == 0


@pytest.mark.parametrize(
    ("name", "splits"), [("tiny.en", 1), ("base", 4), ("small", 2), ("medium", 1), ("large-v3", 4)]
)
def test_the_kernel_compiles_for_every_whisper_width(name: str, splits: int) -> None:
    if not cuda_rtc.available():
        pytest.skip("NVRTC is not installed (the dev extras bring nvidia-cuda-nvrtc)")
    dims = KNOWN_DIMS[name]
    assert dims.n_audio_state % (16 * absorbed.WARPS) == 0 and dims.n_text_head <= absorbed.MAX_HEADS
    source = resources.files("halkspeech.model").joinpath("assets/absorbed_cross.cu").read_text()
    defines: dict[str, int | str] = {"D": dims.n_audio_state, "HEADS": dims.n_text_head, "WARPS": absorbed.WARPS,
                                     "BK": absorbed.BLOCK_KEYS, "SPLITS": splits}  # fmt: skip
    for arch in ("sm_80", "sm_90"):
        assert cuda_rtc.compile_cubin(source, "absorbed_cross", arch, defines)
