"""The batch-1 decode step as one persistent CUDA kernel (assets/decoder_step.cu), for single-stream latency.

Why: at batch 1 a decode step reads every decoder weight once (large-v3: 1.6 GB, ~0.5 ms at an H100's 3.35
TB/s), but as 8 kernels a layer each kernel is bound by its own latency, not by bandwidth: large-v3's step
took 1.64 ms as 258 fused Triton launches on an H100 (bench/NOTES.md, session 6). A persistent Triton kernel
with grid barriers was no faster (1.60 ms, session 8): each phase still waited on its own weight loads. Here
each block copies its share of the weights of the phase two ahead into shared memory (cp.async) before it
waits at the barrier, so the weights stream from HBM while the chain of barriers, activation reads and stores
runs; a layer is 7 phases (the attentions folded into their neighbours: StepPlan).

Used for decode steps of exactly one slot (the engine's batch-1 bucket) on CUDA GPUs with cp.async (sm80+)
whose shared memory holds a block's plan; the kernel is compiled by NVRTC on first use (a few seconds).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor, nn

from halkspeech.model import cuda_rtc
from halkspeech.model.cache import KVCache
from halkspeech.model.dims import ModelDims

log = logging.getLogger(__name__)

# Each layer's tensors in the kernel's LayerPtrs order (parameters of whisper.DecoderBlock)
LAYER_FIELDS = (
    "qkv.weight", "qkv.bias", "attn_ln.weight", "attn_ln.bias", "out.weight", "out.bias",
    "cross_ln.weight", "cross_ln.bias", "cross_q.weight", "cross_q.bias", "cross_out.weight", "cross_out.bias",
    "mlp_ln.weight", "mlp_ln.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
)  # fmt: skip
HEAD_DIM = 64  # every Whisper's attention heads
THREADS = 512  # a block: 16 warps, 64 groups of 8 lanes
SPIN_LIMIT = 1 << 22  # polls before a barrier gives up (~1-2 s of waiting; see decoder_step.cu)


class PersistentUnavailable(RuntimeError):
    """The persistent step cannot run here (the reason says why); the fused launches serve instead."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align16(n: int) -> int:
    return _cdiv(n, 16) * 16


@dataclass(frozen=True)
class StepPlan:
    """How a step's work is split over `blocks` (one per SM) and where each piece sits in shared memory.

    Row splits: the q/k/v projection's 3D rows, the D rows of cross q, cross out and fc2, fc1's 4D rows, each a
    contiguous run per block. Head splits: `blocks // heads` blocks per head; in the self-attention phase each
    recomputes its head's attention (a few KB of keys) and multiplies its chunk of W_out's rows restricted to
    the head's 64 columns, adding into x with atomics; in the cross phase each takes a run of the 1500 audio
    keys (their keys and values prefetched) and leaves a partial softmax that the next phase merges."""

    d: int
    heads: int
    layers: int
    audio_ctx: int
    text_ctx: int
    blocks: int
    threads: int = THREADS
    itemsize: int = 2

    @classmethod
    def for_dims(cls, dims: ModelDims, blocks: int) -> StepPlan:
        return cls(dims.n_text_state, dims.n_text_head, dims.n_text_layer, dims.n_audio_ctx, dims.n_text_ctx, blocks)

    @property
    def rows_qkv(self) -> int:
        return _cdiv(3 * self.d, self.blocks)

    @property
    def rows_d(self) -> int:
        return _cdiv(self.d, self.blocks)

    @property
    def rows_fc1(self) -> int:
        return _cdiv(4 * self.d, self.blocks)

    @property
    def per_head(self) -> int:
        """Blocks per head in the two attention phases (out-projection chunks; audio-key splits)."""
        return self.blocks // self.heads

    @property
    def rows_chunk(self) -> int:
        return _cdiv(self.d, self.per_head)

    @property
    def keys_split(self) -> int:
        return _cdiv(self.audio_ctx, self.per_head)

    def weight_bytes(self) -> list[int]:
        """A block's prefetched bytes in each of the 7 phases (weights; the cross phase's keys and values)."""
        d, s = self.d, self.itemsize
        return [
            self.rows_qkv * d * s,
            self.rows_chunk * HEAD_DIM * s,
            self.rows_d * d * s,
            2 * self.keys_split * HEAD_DIM * s,
            self.rows_d * d * s,
            self.rows_fc1 * d * s,
            self.rows_d * 4 * d * s,
        ]

    @property
    def bias_bytes(self) -> int:
        """A bias run as copied: from the block's first row rounded down to 8 to its last rounded up."""
        return _align16((max(self.rows_qkv, self.rows_chunk, self.rows_d, self.rows_fc1) + 16) * self.itemsize)

    def layout(self) -> dict[str, int]:
        """Byte offsets of the shared-memory regions and the per-phase bias and LayerNorm offsets in a buffer."""
        out: dict[str, int] = {}
        ends = []
        for phase, size in enumerate(self.weight_bytes()):
            bias = out[f"BIAS_OFF_{phase}"] = _align16(size)
            end = bias + self.bias_bytes
            if phase in (0, 2, 5):  # the phases that start with a LayerNorm also hold its weight and bias
                out[f"LN_OFF_{phase}"] = end
                end += 2 * self.d * self.itemsize
            ends.append(end)
        buf = out["BUF_BYTES"] = _align16(max(ends))
        regions = {
            # LayerNorm output (D floats), fc2's input (4D halves), an attention's per-warp sums
            "ACT_OFF": max(4 * self.d, 4 * self.d * self.itemsize, (self.threads - 32) // 32 * HEAD_DIM * 4),
            "SCORES_OFF": 4 * self.keys_split,
            "RED_OFF": 4 * 32,
            "PART_OFF": 4 * ((self.threads - 32) // 8),
            "QV_OFF": 4 * HEAD_DIM,
            "OV_OFF": 4 * HEAD_DIM,
            "XROW_OFF": 4 * self.rows_d,
            "PTR_OFF": 8 * len(LAYER_FIELDS) * self.layers,
            "MBAR_OFF": 32,  # two mbarriers per buffer: its copies have landed; its readers are done
        }
        at = 2 * buf
        for name, size in regions.items():
            out[name] = at
            at += _align16(size)
        out["SHARED_BYTES"] = at
        return out

    @property
    def shared_bytes(self) -> int:
        return self.layout()["SHARED_BYTES"]

    def check(self, max_shared: int) -> None:
        """Raise PersistentUnavailable unless the kernel can run this plan."""
        if self.d % HEAD_DIM or self.d != self.heads * HEAD_DIM:
            raise PersistentUnavailable(f"width {self.d} is not {self.heads} heads of {HEAD_DIM}")
        if self.blocks < self.heads:
            raise PersistentUnavailable(f"{self.blocks} SMs for {self.heads} heads")
        if self.shared_bytes > max_shared:
            raise PersistentUnavailable(f"needs {self.shared_bytes} bytes of shared memory a block, has {max_shared}")

    def defines(self, bf16: bool) -> dict[str, int | str]:
        """The kernel's compile-time constants."""
        return {
            "D": self.d, "H": self.heads, "L": self.layers, "A": self.audio_ctx, "NCTX": self.text_ctx,
            "G": self.blocks, "NT": self.threads, "BF16": int(bf16), "RP_QKV": self.rows_qkv,
            "RP_D": self.rows_d, "RP_FC1": self.rows_fc1, "C_OUT": self.per_head, "RC": self.rows_chunk,
            "S_X": self.per_head, "KS": self.keys_split, "SPIN_LIMIT": f"{SPIN_LIMIT}LL", **self.layout(),
        }  # fmt: skip


@functools.cache
def source() -> str:
    return resources.files("halkspeech.model").joinpath("assets/decoder_step.cu").read_text()


@functools.cache
def compile_plan(plan: StepPlan, arch: str, bf16: bool, experiment: tuple[tuple[str, int], ...] = ()) -> bytes:
    """The kernel for `plan` as a cubin for `arch` (e.g. "sm_90"); needs NVRTC, not a GPU. `experiment`: extra
    defines for timing its parts (bench/gpu_persistent.py: PREFETCH=0, PHASE_MASK), which make its results wrong."""
    return cuda_rtc.compile_cubin(source(), "decoder_step", arch, {**plan.defines(bf16), **dict(experiment)})


class PersistentStep:
    """A decoder's batch-1 step in one launch: `step(tokens [1], positions [1], cache)` → hidden state [1, D]
    after the last layer (before the final LayerNorm), in the model's dtype. The weights must not change after
    it is built (the kernel holds their addresses)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        token_embedding: Tensor,
        positional_embedding: Tensor,
        dims: ModelDims,
        *,
        cooperative: bool = True,
        experiment: tuple[tuple[str, int], ...] = (),
    ) -> None:
        device, dtype = token_embedding.device, token_embedding.dtype
        if device.type != "cuda":
            raise PersistentUnavailable("not a CUDA device")
        if dtype not in (torch.float16, torch.bfloat16):
            raise PersistentUnavailable(f"dtype {dtype} (fp16 and bf16 only)")
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) < (8, 0):
            raise PersistentUnavailable(f"compute capability {props.major}.{props.minor} (cp.async needs 8.0)")
        self.plan = StepPlan.for_dims(dims, props.multi_processor_count)
        self.plan.check(int(getattr(props, "shared_memory_per_block_optin", 0)))
        if not cuda_rtc.available():
            raise PersistentUnavailable("NVRTC not found")
        tensors = [[blk.get_parameter(name) for name in LAYER_FIELDS] for blk in blocks]
        for t in (token_embedding, positional_embedding, *(t for layer in tensors for t in layer)):
            if not t.is_contiguous() or t.dtype != dtype or t.data_ptr() % 16:
                raise PersistentUnavailable("weights must be contiguous, 16-byte aligned and of one dtype")
        with torch.cuda.device(device):
            cubin = compile_plan(self.plan, f"sm_{props.major}{props.minor}", dtype == torch.bfloat16, experiment)
            self.kernel = cuda_rtc.Kernel(cubin, "decoder_step", self.plan.shared_bytes)
            if self.kernel.max_active_blocks(THREADS) < 1:
                raise PersistentUnavailable("a block does not fit on an SM")
        addresses = [[t.data_ptr() for t in layer] for layer in tensors]
        self.table = torch.tensor(addresses, dtype=torch.int64, device=device)
        self._keep = (token_embedding, positional_embedding, tensors)  # the table's addresses stay valid
        d, p = dims.n_text_state, self.plan
        f32 = torch.float32
        self.x = torch.zeros(d, dtype=f32, device=device)  # the residual stream
        self.q = torch.zeros(d, dtype=f32, device=device)
        self.cross_q = torch.zeros(d, dtype=f32, device=device)
        self.partial = torch.zeros(p.heads * p.per_head * (HEAD_DIM + 2), dtype=f32, device=device)
        self.hidden = torch.zeros(4 * d, dtype=dtype, device=device)
        self.out = torch.zeros(1, d, dtype=dtype, device=device)
        self.barrier = torch.zeros(4, dtype=torch.int32, device=device)
        self.cooperative = cooperative
        self.dtype = dtype

    def step(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """One token for slot 0: tokens, positions [1] (int64, on the device) → [1, D] (this object's buffer)."""
        kv, ck, cv = cache.self_kv, cache.cross_k, cache.cross_v
        if kv.dtype != self.dtype or not (kv.is_contiguous() and ck.is_contiguous() and cv.is_contiguous()):
            raise ValueError("the cache must be contiguous and in the model's dtype")
        if tokens.dtype != torch.int64 or positions.dtype != torch.int64 or tokens.numel() != 1:
            raise ValueError("one int64 token and position")
        self.kernel.launch(
            self.plan.blocks,
            THREADS,
            [
                self.table, self._keep[0], self._keep[1], tokens, positions, kv, ck, cv,
                kv.stride(0), ck.stride(0), ck.stride(2),
                self.x, self.q, self.cross_q, self.partial, self.hidden, self.out, self.barrier,
            ],
            cooperative=self.cooperative,
        )  # fmt: skip
        return self.out

    def check(self) -> None:
        """Raise if a barrier gave up waiting since the last check (that step's output is wrong); syncs."""
        if int(self.barrier[2].item()):
            self.barrier.zero_()
            raise RuntimeError("the persistent decode step's grid barrier timed out (a block never ran)")
