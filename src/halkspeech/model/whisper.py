"""A compact PyTorch Whisper: audio encoder and text decoder over static per-slot caches.

The decoder has two entry points, both batched over slots:
  * `prefill`: a new sequence's prompt (several tokens) into arbitrary slots, causal attention;
  * `step`: one token for each of the slots 0..B-1 at per-slot positions, reading a fixed window of the cache.
`step` has static shapes for a given (B, window), which is what the engine captures in CUDA graphs.
Weights arrive in OpenAI's checkpoint layout (`from_openai_state_dict`) and are fused on load: q/k/v of
self-attention into one matrix, and the cross-attention k/v of every layer into one matrix per layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from halkspeech.model import absorbed, kernels
from halkspeech.model.absorbed import AbsorbedCross
from halkspeech.model.cache import KVCache
from halkspeech.model.dims import ModelDims
from halkspeech.model.int8 import Int8Linear, quantize_linears

# Attention kernels for the decoder's eager passes (prefill, alignment), whose (batch, length) changes almost every
# call. cuDNN's attention, which PyTorch prefers on Hopper, builds an execution plan for each new shape: ~9 ms of
# host time, measured inside a long-form run on an H100 (bench/gpu_align_insitu.py), 20× the pass itself. Flash and
# memory-efficient attention need no plan. The encoder (a few batch sizes) and the graph-captured step keep cuDNN.
VARIABLE_SHAPE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Programs sharing each (slot, head) of a fused step's cross-attention: 1500 keys in blocks of 128 (kernels.py)
CROSS_SPLITS = 16


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> Tensor:
    """Fixed positional embedding of the encoder: [length, channels], sin half then cos half."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, H*Dh] → [B, H, T, Dh]."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, Dh] → [B, T, H*Dh]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)  # the key has no bias in Whisper: that third of the bias is zero
        self.out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, A, D]
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.attn_ln(x)).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(_merge_heads(a))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))

    def forward_fused(self, x: Tensor, batch: int, attn_shift: Tensor, mlp_shift: Tensor) -> None:
        """`forward` in place on x [B*A, D]: the residual stream less the out and fc2 biases added so far, which
        the LayerNorms add back (shifts [D], float32; kernels.layer_norm). Each residual add is then the GEMM
        of its projection (beta = 1), not a kernel of its own."""
        d = x.shape[1]
        h = self.qkv(kernels.layer_norm(x, self.attn_ln.weight, self.attn_ln.bias, shift=attn_shift))
        q, k, v = (_split_heads(t, self.heads) for t in h.view(batch, -1, 3 * d).chunk(3, dim=-1))
        x.addmm_(_merge_heads(F.scaled_dot_product_attention(q, k, v)).view(-1, d), self.out.weight.t())
        h = kernels.layer_norm(x, self.mlp_ln.weight, self.mlp_ln.bias, shift=mlp_shift)
        x.addmm_(F.gelu(self.fc1(h)), self.fc2.weight.t())


class Encoder(nn.Module):
    positional_embedding: Tensor

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, d))
        self.blocks = nn.ModuleList(EncoderBlock(d, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = nn.LayerNorm(d)
        # with the fused path on (`use_fused_kernels`): the biases the residual stream lacks before each
        # LayerNorm, [2 * layers + 1, D] float32 (before each block's attention and MLP, then ln_post)
        self.shifts: Tensor | None = None

    def use_fused_kernels(self, on: bool) -> bool:
        """Run the blocks as `EncoderBlock.forward_fused` where they can run (CUDA with Triton); the weights
        must not change afterwards. Returns whether they will. The residual adds, two kernels a layer that
        each read two [B*1500, D] tensors and write one, become part of the projections' GEMMs."""
        self.shifts = None
        if on and kernels.available(self.ln_post.weight.device):
            blocks = cast(Iterable[EncoderBlock], self.blocks)
            biases = torch.stack([b for block in blocks for b in (block.out.bias, block.fc2.bias)]).float()
            self.shifts = F.pad(biases.cumsum(0), (0, 0, 1, 0))
        return self.shifts is not None

    def forward(self, mel: Tensor) -> Tensor:
        # mel: [B, n_mels, 3000] → [B, 1500, D]
        x = F.gelu(self.conv1(mel))
        # contiguous: a transposed view would make every later residual add a strided kernel
        # (measured on an H200: 108 of 378 ms of a batch-64 encoder pass)
        x = F.gelu(self.conv2(x)).transpose(1, 2).contiguous()
        x = x + self.positional_embedding.to(x.dtype)
        if self.shifts is not None:
            return self._forward_fused(x)
        for block in self.blocks:
            x = block(x)
        return cast(Tensor, self.ln_post(x))

    def _forward_fused(self, x: Tensor) -> Tensor:
        b, a, d = x.shape
        stream, shifts = x.view(b * a, d), cast(Tensor, self.shifts)  # x is this call's own: updated in place
        for i, block in enumerate(cast(Iterable[EncoderBlock], self.blocks)):
            block.forward_fused(stream, b, shifts[2 * i], shifts[2 * i + 1])
        post = self.ln_post
        return kernels.layer_norm(stream, post.weight, post.bias, shift=shifts[-1]).view(b, a, d)


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.cross_ln = nn.LayerNorm(d)
        self.cross_q = nn.Linear(d, d)
        self.cross_out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self._head_indexes: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))

    def _head_index(self, heads: list[int], device: torch.device) -> Tensor:
        """The heads as an index tensor on `device`, made once (a host→device copy is a stream sync)."""
        key = (tuple(heads), device)
        index = self._head_indexes.get(key)
        if index is None:
            index = self._head_indexes[key] = torch.tensor(heads, device=device)
        return index

    def _cross(
        self, x: Tensor, k: Tensor, v: Tensor, scores_of: list[int] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        # k, v: [B, H, A, Dh]; scores_of: heads whose scaled scores q·k/√Dh [B, h, T, A] to return
        q = _split_heads(self.cross_q(self.cross_ln(x)), self.heads)
        scores = None
        if scores_of:
            heads = self._head_index(scores_of, x.device)
            scores = (q[:, heads].float() @ k[:, heads].float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        return x + self.cross_out(_merge_heads(F.scaled_dot_product_attention(q, k, v))), scores

    def prefill(
        self,
        x: Tensor,
        layer: int,
        cache: KVCache,
        slots: Tensor,
        scores_of: list[int] | None = None,
        *,
        keep: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        # x: [B, P, D] prompt positions 0..P-1 of the sequences in `slots` [B]; keep: write their self-attention
        # keys/values into the cache (not for an alignment pass, which decodes nothing after)
        b, p, d = x.shape
        qkv = self.qkv(self.attn_ln(x))
        if keep:
            cache.self_kv[layer, slots, :p] = qkv[..., d:].view(b, p, 2, self.heads, -1)
        q, k, v = (_split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        x = x + self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=p > 1)))
        x, scores = self._cross(x, cache.cross_k[layer, slots], cache.cross_v[layer, slots], scores_of)
        return self._mlp(x), scores

    def step(
        self,
        x: Tensor,
        layer: int,
        cache: KVCache,
        rows: Tensor,
        mask: Tensor | None,
        positions: Tensor,
        over_audio: AbsorbedCross | None = None,
    ) -> Tensor:
        # x: [B, 1, D] for slots 0..B-1; rows: [B] cache rows slot*T + position; mask: [B, 1, 1, W] additive,
        # or None: each slot's keys up to its position [B] in the Triton decode attention (kernels.py);
        # over_audio: the cross-attention reads the slots' audio (cache.cross_e) instead of their keys and values
        b, d = x.shape[0], x.shape[-1]
        qkv = self.qkv(self.attn_ln(x))  # [B, 1, 3D]
        cache.write_step(layer, rows, qkv[:, 0, d:])
        q = _split_heads(qkv[..., :d], self.heads)
        if mask is None:
            a = _attend_written_keys(q[:, :, 0], layer, cache, positions)[:, None]
        else:
            keys, values = cache.keys(layer, b, mask.shape[-1]), cache.values(layer, b, mask.shape[-1])
            a = _merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
        x = x + self.out(a)
        if over_audio is not None and cache.cross_e is not None:  # the audio itself (model/absorbed.py)
            q = self.cross_q(self.cross_ln(x))[:, 0].view(b, self.heads, -1)
            a = over_audio.cross(layer, q, cache.cross_e)
            x = x + F.linear(a, self.cross_out.weight, over_audio.bias[layer])[:, None]
        else:
            x, _ = self._cross(x, cache.cross_k[layer, :b], cache.cross_v[layer, :b])
        return self._mlp(x)

    def step_fused(self, x: Tensor, layer: int, cache: KVCache, rows: Tensor, positions: Tensor) -> Tensor:
        """`step` with the fused kernels (kernels.py): x [B, D] → [B, D] in eight launches, where the plain
        step makes ~20: four projections with their LayerNorm, bias, GELU and residual add folded in (the
        first also writes the new key and value into the cache), two attentions and the MLP's two."""
        b, d, heads = x.shape[0], x.shape[1], self.heads
        qkv = kernels.linear(
            x, self.qkv.weight, self.qkv.bias, ln=_ln(self.attn_ln), kv=(cache.step_rows(layer), rows, d)
        )
        a = _attend_written_keys(qkv[:, :d].view(b, heads, -1), layer, cache, positions)
        x = kernels.linear(a, self.out.weight, self.out.bias, residual=x)
        q = kernels.linear(x, self.cross_q.weight, self.cross_q.bias, ln=_ln(self.cross_ln)).view(b, heads, -1)
        a = kernels.decode_attention(q, cache.cross_k[layer, :b], cache.cross_v[layer, :b], splits=CROSS_SPLITS)
        x = kernels.linear(a, self.cross_out.weight, self.cross_out.bias, residual=x)
        h = kernels.linear(x, self.fc1.weight, self.fc1.bias, ln=_ln(self.mlp_ln), gelu=True)
        return kernels.linear(h, self.fc2.weight, self.fc2.bias, residual=x)


def _cpu_vector_logits(row: Tensor, weight: Tensor) -> Tensor:
    """One row's logits on a CPU: [1, D] × [V, D] → [1, V] as two halves of the vocabulary in one batched
    product. MKL runs a one-row product on one thread, at about half the memory bandwidth of two (base's
    embedding: 8.8-9.5 ms against 4.8 on 2 cores, bench/cpu_logits.py); a batch of two runs one on each."""
    vocab, halves = weight.shape[0], weight.shape[0] // 2 * 2
    pair = weight[:halves].view(2, halves // 2, weight.shape[1])
    out = torch.bmm(pair, row.T.unsqueeze(0).expand(2, -1, -1)).reshape(1, halves)  # [2, V/2, 1] in vocab order
    return out if halves == vocab else torch.cat([out, row @ weight[halves:].T], dim=1)


def _ln(norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    return norm.weight, norm.bias


def _attend_written_keys(q: Tensor, layer: int, cache: KVCache, positions: Tensor) -> Tensor:
    """Self-attention of a step in the Triton decode attention: q [B, H, Dh] of slots 0..B-1 over each slot's
    keys up to its position [B] (no mask, no window) → [B, H*Dh]."""
    b, ctx = q.shape[0], cache.n_text_ctx
    keys, values = cache.keys(layer, b, ctx), cache.values(layer, b, ctx)
    return kernels.decode_attention(q, keys, values, lengths=positions, length_offset=1)


class Decoder(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        d = dims.n_text_state
        self.dims = dims
        self.token_embedding = nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.empty(dims.n_text_ctx, d))
        self.blocks = nn.ModuleList(DecoderBlock(d, dims.n_text_head) for _ in range(dims.n_text_layer))
        self.ln = nn.LayerNorm(d)
        # Cross-attention keys and values of every layer: [L, 2*D, D] weights and [L, 2*D] biases (k part 0).
        self.cross_kv_weight = nn.Parameter(torch.empty(dims.n_text_layer, 2 * d, d))
        self.cross_kv_bias = nn.Parameter(torch.empty(dims.n_text_layer, 2 * d))
        # steps of at most this many slots use the fused kernels (kernels.py; CUDA with Triton only; 0: never);
        # with them on, larger steps take their self-attention from the Triton decode attention (no mask, no window)
        self.fused_max_batch = 0
        # steps of at least this many slots (and more than fused_max_batch) take their cross-attention over the
        # slots' audio with these weights (model/absorbed.py; 0: never)
        self.absorbed_min_batch = 0
        self.absorbed: AbsorbedCross | None = None
        self.int8_logits: Int8Linear | None = None  # the token embedding as int8 (Whisper.quantize_int8)

    def layers(self) -> Iterable[tuple[int, DecoderBlock]]:
        return enumerate(cast(Iterable[DecoderBlock], self.blocks))

    def logits(self, x: Tensor) -> Tensor:
        # [B, T, D] → [B, T, V] in float32
        h, weight = self.ln(x), self.token_embedding.weight
        if h.device.type != "cpu":
            return (h @ weight.T).float()
        # On a CPU, [V, D] @ [D, B·T] and a transposed view of the result: MKL's kernel for this orientation took
        # 5-9 ms for 2-8 rows of base's 51,865 × 512 embedding where x @ W.T took 20-25 ms (2 cores; equal at 1 row)
        rows = h.reshape(-1, h.shape[-1])
        if self.int8_logits is not None:
            flat = self.int8_logits(rows)
        else:
            flat = _cpu_vector_logits(rows, weight) if rows.shape[0] == 1 else (weight @ rows.T).T
        return flat.reshape(*h.shape[:-1], weight.shape[0]).float()

    def fill_cross(self, audio: Tensor, cache: KVCache, slots: Tensor) -> None:
        """Compute each layer's cross-attention keys/values of `audio` [B, A, D] into `slots` [B]."""
        heads = self.dims.n_text_head
        audio = audio.to(self.cross_kv_weight.dtype)
        for layer in range(self.dims.n_text_layer):
            kv = F.linear(audio, self.cross_kv_weight[layer], self.cross_kv_bias[layer])  # [B, A, 2D]
            k, v = kv.chunk(2, dim=-1)
            cache.store_cross(layer, slots, _split_heads(k, heads), _split_heads(v, heads))
        cache.store_audio(slots, audio)

    def prefill(self, tokens: Tensor, cache: KVCache, slots: Tensor) -> Tensor:
        """Prompt tokens [B, P] (right-padded) into `slots`; returns hidden states [B, P, D].

        Logits are left to the caller, for the few positions it needs: [B, P, V] for a long prompt is
        gigabytes (64 × 200 × 51866 floats)."""
        p = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:p]
        with sdpa_kernel(VARIABLE_SHAPE_ATTENTION):
            for layer, block in self.layers():
                x, _ = block.prefill(x, layer, cache, slots)
        return x

    def align(
        self, tokens: Tensor, cache: KVCache, slots: Tensor, heads: tuple[tuple[int, int], ...]
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass for word timings: tokens [B, T] (right-padded) in `slots` whose cross
        keys/values are cached. Returns hidden states [B, T, D] (logits are left to the caller, for the
        positions it needs) and the alignment heads' scaled cross-attention scores [B, len(heads), T, A],
        in the order of `heads` ((layer, head) pairs)."""
        p = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:p]
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        found: dict[tuple[int, int], Tensor] = {}
        with sdpa_kernel(VARIABLE_SHAPE_ATTENTION):
            for layer, block in self.layers():
                x, scores = block.prefill(x, layer, cache, slots, by_layer.get(layer), keep=False)
                if scores is not None:
                    for i, head in enumerate(by_layer[layer]):
                        found[(layer, head)] = scores[:, i]
        return x, torch.stack([found[h] for h in heads], dim=1)

    def step(self, tokens: Tensor, positions: Tensor, cache: KVCache, window: int) -> Tensor:
        """One token per slot 0..B-1: tokens [B] at positions [B] → logits [B, V]. Keys beyond each slot's
        position are masked; `window` (≥ every position + 1) bounds how much of the cache is read, except with
        the fused kernels on (`step_window`), which read each slot's keys up to its position.

        A row may be past the context: a slot whose sequence took its last token at the last position is
        advanced once more by a step launched before its end was read, and stays there while idle. Its row is
        computed at the last position (its own last cache row, never read: a new sequence overwrites it),
        not at n_text_ctx, which indexed past the positional embedding and wrote the next slot's first
        key and value."""
        if tokens.shape[0] <= self.fused_max_batch:
            return self._step_fused(tokens, positions, cache)
        positions = positions.clamp(max=cache.n_text_ctx - 1)
        x = (self.token_embedding(tokens) + self.positional_embedding[positions])[:, None]  # [B, 1, D]
        mask = None
        if not self.fused_max_batch:
            keys = torch.arange(window, device=tokens.device)
            hidden = (keys[None, :] > positions[:, None])[:, None, None, :]  # [B, 1, 1, W] keys not yet written
            mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill_(hidden, float("-inf"))
        slots = torch.arange(tokens.shape[0], device=tokens.device)
        rows = slots * cache.n_text_ctx + positions  # one flat cache row per slot, computed once per step
        over_audio = self.absorbed if 0 < self.absorbed_min_batch <= tokens.shape[0] else None
        for layer, block in self.layers():
            x = block.step(x, layer, cache, rows, mask, positions, over_audio)
        return self.logits(x)[:, 0]

    def _step_fused(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        # the same step in 8 launches a layer, one for the inputs and one for the logits (float32); no mask:
        # each slot's self-attention reads its keys up to its position (both kernels clamp it to the context)
        x, rows = kernels.step_inputs(
            tokens, positions, self.token_embedding.weight, self.positional_embedding, cache.n_text_ctx
        )
        for layer, block in self.layers():
            x = block.step_fused(x, layer, cache, rows, positions)
        return kernels.linear(x, self.token_embedding.weight, ln=_ln(self.ln), out_dtype=torch.float32)

    def step_window(self, window: int) -> int:
        """The window a step depends on: 0 with the fused kernels on, whose attention has none."""
        return 0 if self.fused_max_batch else window

    def use_absorbed_cross(self, min_batch: int, *, reference: bool = False) -> bool:
        """Steps of at least `min_batch` slots (and more than fused_max_batch) read each slot's audio in their
        cross-attention instead of its keys and values (model/absorbed.py), where the kernel runs (CUDA, sm_80+,
        fp16, NVRTC) and pays (models of absorbed.MIN_WIDTH or wider), or anywhere with `reference` (its
        PyTorch stand-in, for tests); the cache must keep the audio (KVCache.allocate(audio=True)). Returns
        whether it will."""
        w = self.cross_kv_weight
        heads, width = self.dims.n_text_head, w.shape[-1]
        # `supported` compiles the kernels: only asked when the setting wants them
        on = min_batch > 0 and (
            reference or (width >= absorbed.MIN_WIDTH and absorbed.supported(w.device, w.dtype, width, heads))
        )
        self.absorbed_min_batch = min_batch if on else 0
        self.absorbed = None
        if on:
            out = [(block.cross_out.weight, block.cross_out.bias) for _, block in self.layers()]
            self.absorbed = AbsorbedCross.of(w.detach(), self.cross_kv_bias.detach(), out, heads, reference=reference)
        return on

    def use_fused_kernels(self, max_batch: int) -> bool:
        """Run steps of at most `max_batch` slots with the fused kernels, where they can run (a CUDA device
        with Triton); returns whether they will."""
        self.fused_max_batch = max_batch if kernels.available(self.token_embedding.weight.device) else 0
        return self.fused_max_batch > 0


class Whisper(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = Encoder(dims)
        self.decoder = Decoder(dims)

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    @property
    def int8(self) -> bool:
        return self.decoder.int8_logits is not None

    def quantize_int8(self) -> None:
        """int8 weights (model/int8.py) for every projection of the encoder's and decoder's blocks and for the
        logits, in place; a float32 model on the CPU only. The token embedding stays float32 for its lookups,
        the cross-attention projection (once per window) and the convolutions too."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"int8 weights need a float32 model on the CPU, not {self.dtype} on {self.device}")
        quantize_linears(self.encoder.blocks)
        quantize_linears(self.decoder.blocks)
        self.decoder.int8_logits = Int8Linear(self.decoder.token_embedding.weight, None)

    @classmethod
    def from_openai_state_dict(
        cls,
        dims: ModelDims,
        state_dict: dict[str, Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Whisper:
        """Build the model from OpenAI checkpoint names (see model/weights.py), fusing projections."""
        with torch.device("meta"):
            model = cls(dims)
        model.load_state_dict(fuse_openai_state_dict(dims, state_dict), assign=True)
        return model.to(device=device, dtype=dtype).eval()


def fuse_openai_state_dict(dims: ModelDims, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI names → this module's names: q/k/v fused, every layer's cross k/v stacked."""
    out: dict[str, Tensor] = {}

    def lin(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def qkv(dst: str, src: str) -> None:
        q_bias = sd[f"{src}.query.bias"]
        out[f"{dst}.weight"] = torch.cat([sd[f"{src}.{n}.weight"] for n in ("query", "key", "value")])
        out[f"{dst}.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), sd[f"{src}.value.bias"]])

    for part in ("conv1", "conv2", "ln_post"):
        lin(f"encoder.{part}", f"encoder.{part}")
    for i in range(dims.n_audio_layer):
        src, dst = f"encoder.blocks.{i}", f"encoder.blocks.{i}"
        qkv(f"{dst}.qkv", f"{src}.attn")
        lin(f"{dst}.out", f"{src}.attn.out")
        lin(f"{dst}.attn_ln", f"{src}.attn_ln")
        lin(f"{dst}.mlp_ln", f"{src}.mlp_ln")
        lin(f"{dst}.fc1", f"{src}.mlp.0")
        lin(f"{dst}.fc2", f"{src}.mlp.2")
    out["encoder.positional_embedding"] = sd["encoder.positional_embedding"]
    out["decoder.token_embedding.weight"] = sd["decoder.token_embedding.weight"]
    out["decoder.positional_embedding"] = sd["decoder.positional_embedding"]
    lin("decoder.ln", "decoder.ln")
    kv_weights, kv_biases = [], []
    for i in range(dims.n_text_layer):
        src = dst = f"decoder.blocks.{i}"
        qkv(f"{dst}.qkv", f"{src}.attn")
        lin(f"{dst}.out", f"{src}.attn.out")
        lin(f"{dst}.attn_ln", f"{src}.attn_ln")
        lin(f"{dst}.cross_ln", f"{src}.cross_attn_ln")
        lin(f"{dst}.cross_q", f"{src}.cross_attn.query")
        lin(f"{dst}.cross_out", f"{src}.cross_attn.out")
        lin(f"{dst}.mlp_ln", f"{src}.mlp_ln")
        lin(f"{dst}.fc1", f"{src}.mlp.0")
        lin(f"{dst}.fc2", f"{src}.mlp.2")
        v_bias = sd[f"{src}.cross_attn.value.bias"]
        kv_weights.append(torch.cat([sd[f"{src}.cross_attn.key.weight"], sd[f"{src}.cross_attn.value.weight"]]))
        kv_biases.append(torch.cat([torch.zeros_like(v_bias), v_bias]))
    out["decoder.cross_kv_weight"] = torch.stack(kv_weights)
    out["decoder.cross_kv_bias"] = torch.stack(kv_biases)
    return out
