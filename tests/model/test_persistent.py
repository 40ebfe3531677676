"""The persistent batch-1 step's plan and kernel source (model/persistent.py, assets/decoder_step.cu).

On the CPU: the plan splits every phase's rows, heads and audio keys exactly once over the blocks and its
shared-memory layout fits an H100/H200 block; the kernel compiles with NVRTC (no GPU needed; nvidia-cuda-nvrtc
is a dev dependency); the decoder falls back to its other paths where the kernel cannot run. On a GPU (skipped
elsewhere): the kernel's logits and cache writes equal the fused launches' on real-shaped random weights with
random biases. Its speed is measured by bench/gpu_persistent.py, never here."""

from __future__ import annotations

import pytest
import torch

from halkspeech.model import cuda_rtc
from halkspeech.model.dims import KNOWN_DIMS
from halkspeech.model.persistent import (
    HEAD_DIM,
    PersistentStep,
    PersistentUnavailable,
    StepPlan,
    compile_plan,
)
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

HOPPER_SMS, HOPPER_SHARED = 132, 232_448  # H100 SXM and H200: SMs, opt-in shared memory a block


def _covered(blocks: int, rows: int, n: int) -> list[int]:
    """How often each of n rows is taken when block b takes rows [b*rows, b*rows + rows)."""
    seen = [0] * n
    for b in range(blocks):
        for r in range(b * rows, min(n, (b + 1) * rows)):
            seen[r] += 1
    return seen


@pytest.mark.parametrize("name", ["tiny.en", "base", "large-v3", "large-v3-turbo"])
def test_the_plan_splits_every_row_head_and_key_once(name: str) -> None:
    dims = KNOWN_DIMS[name]
    plan = StepPlan.for_dims(dims, HOPPER_SMS)
    d = dims.n_text_state
    for rows, n in ((plan.rows_qkv, 3 * d), (plan.rows_d, d), (plan.rows_fc1, 4 * d)):
        assert _covered(plan.blocks, rows, n) == [1] * n
    # head splits: blocks h * per_head + c for h < heads; chunks of W_out's rows and runs of audio keys
    assert plan.heads * plan.per_head <= plan.blocks
    assert _covered(plan.per_head, plan.rows_chunk, d) == [1] * d
    assert _covered(plan.per_head, plan.keys_split, dims.n_audio_ctx) == [1] * dims.n_audio_ctx


@pytest.mark.parametrize("name", ["tiny.en", "large-v3", "large-v3-turbo"])
def test_the_shared_memory_layout_fits_a_hopper_block(name: str) -> None:
    plan = StepPlan.for_dims(KNOWN_DIMS[name], HOPPER_SMS)
    plan.check(HOPPER_SHARED)
    layout = plan.layout()
    assert all(v % 16 == 0 for v in layout.values())
    # each phase's weights, bias run and LayerNorm fit its buffer without overlapping
    for phase, size in enumerate(plan.weight_bytes()):
        assert size <= layout[f"BIAS_OFF_{phase}"]
        end = layout[f"BIAS_OFF_{phase}"] + plan.bias_bytes
        if f"LN_OFF_{phase}" in layout:
            assert end <= layout[f"LN_OFF_{phase}"]
            end = layout[f"LN_OFF_{phase}"] + 2 * plan.d * plan.itemsize
        assert end <= layout["BUF_BYTES"]
    regions = sorted((v, k) for k, v in layout.items() if k.endswith("_OFF") and not k[-5].isdigit())
    assert regions[0][0] == 2 * layout["BUF_BYTES"]
    assert layout["SHARED_BYTES"] <= HOPPER_SHARED


def test_a_plan_that_cannot_run_says_why() -> None:
    with pytest.raises(PersistentUnavailable, match="shared memory"):
        StepPlan.for_dims(KNOWN_DIMS["large-v3"], 108).check(HOPPER_SHARED)  # an A100's 108 SMs: shares too big
    with pytest.raises(PersistentUnavailable, match="SMs"):
        StepPlan.for_dims(KNOWN_DIMS["large-v3"], 16).check(HOPPER_SHARED)
    assert StepPlan.for_dims(KNOWN_DIMS["large-v3"], HOPPER_SMS).d == 20 * HEAD_DIM


@pytest.mark.skipif(not cuda_rtc.available(), reason="NVRTC not installed")
@pytest.mark.parametrize(("name", "bf16"), [("tiny.en", False), ("large-v3", False), ("large-v3", True)])
def test_the_kernel_compiles_for_hopper(name: str, bf16: bool) -> None:
    cubin = compile_plan(StepPlan.for_dims(KNOWN_DIMS[name], HOPPER_SMS), "sm_90", bf16)
    assert cubin[:4] == b"\x7fELF"  # a CUDA binary: an ELF image


def test_compile_errors_carry_nvrtc_s_log() -> None:
    if not cuda_rtc.available():
        pytest.skip("NVRTC not installed")
    with pytest.raises(cuda_rtc.CudaRtcError, match="undefined"):
        cuda_rtc.compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "k", "sm_90", {})


def test_on_a_cpu_the_decoder_keeps_its_other_step() -> None:
    weights = random_weights("tiny.en")
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict)
    assert not model.decoder.use_persistent_step(True)
    assert model.decoder.persistent is None
    d = model.decoder
    with pytest.raises(PersistentUnavailable, match="CUDA"):
        PersistentStep(list(d.blocks), d.token_embedding.weight, d.positional_embedding, weights.dims)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_gpu_the_kernel_gives_the_fused_steps_logits_and_cache() -> None:
    from halkspeech.model.cache import KVCache

    dev = torch.device("cuda")
    weights = random_weights("tiny.en", device=dev, seed=3)
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=torch.float16, device=dev)
    g = torch.Generator(device=dev).manual_seed(4)
    with torch.no_grad():  # the catalog's random weights have zero biases: a bias read from a wrong row would pass
        for name, p in model.decoder.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=g, device=dev).to(p.dtype) * 0.05)
    assert model.decoder.use_fused_kernels(16)
    cache = KVCache.allocate(weights.dims, 2, dtype=torch.float16, device=dev)
    audio = torch.randn(1, weights.dims.n_audio_ctx, weights.dims.n_audio_state, device=dev, generator=g).half()
    prompt = torch.tensor([[50257, 50362]], device=dev)
    slot = torch.tensor([0], device=dev)
    with torch.inference_mode():
        model.decoder.fill_cross(audio, cache, slot)
        model.decoder.prefill(prompt, cache, slot)
    start = cache.self_kv.clone()

    def run(persistent: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        cache.self_kv.copy_(start)
        assert model.decoder.use_persistent_step(persistent) == persistent
        out, tok, pos = [], torch.tensor([50362], device=dev), torch.tensor([2], device=dev)
        with torch.inference_mode():
            for i in range(12):
                logits = model.decoder.step(tok, pos, cache, 0)
                out.append(logits.float().clone())
                tok, pos = torch.tensor([1000 + 37 * i], device=dev), pos + 1  # teacher-forced
        return out, cache.self_kv[:, 0].clone()

    want, kv_want = run(False)
    got, kv_got = run(True)
    model.decoder.persistent.check()  # type: ignore[union-attr]
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max() < 0.02 * a.abs().max()
        assert int(a.argmax()) == int(b.argmax())
    assert (kv_want.float() - kv_got.float()).abs().max() < 0.02 * kv_want.float().abs().max()
