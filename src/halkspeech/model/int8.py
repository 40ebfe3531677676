"""int8 weights for the CPU: dynamic quantization of the projections and of the logits' token embedding.

Each weight [out, in] is stored once as int8 with one float scale per output row (symmetric, per channel);
each call quantizes its activations [rows, in] to 8 bits (7 on x86 CPUs without VNNI: `_reduce_range`), each
row with a scale of its own, and runs PyTorch's int8 GEMM (fbgemm on x86, qnnpack on ARM), accumulating in
int32 and returning float32. Decoding on a CPU reads the decoder's weights once per step, so a quarter of the
bytes is most of the gain. The encoder's GEMMs are compute-bound there, and int8 arithmetic is still faster
than float32's.

These are the kernels behind `torch.ao.quantization.quantize_dynamic`, called directly: that eager API is
deprecated in favour of torchao (another dependency), and it scales each weight per tensor where per channel
keeps the error smaller. Attention, LayerNorms and the convolutions stay float32 (the README's "int8 weights
on a CPU" gives the speed and the WER). PyTorch 2.13 deprecates the qint8 tensor that packing a weight
starts from (issue 184982), with no fast replacement in core: `torch._int_mm` on plain int8 took 26 ms for
base's logits at one row where fbgemm took 0.5 and float32 9.6 (this machine). So the warning is silenced at
packing, and a PyTorch without the kernels fails the load with a reason instead of a traceback.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from halkspeech.errors import ModelLoadError


def _pack(weight: Tensor) -> torch.ScriptObject:
    """A float32 weight [out, in] as fbgemm's packed int8 weight, with one symmetric scale per output row."""
    out = weight.shape[0]
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # [out]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        q = torch.quantize_per_channel(weight, scales, torch.zeros(out, dtype=torch.long), axis=0, dtype=torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


@functools.cache
def _reduce_range() -> bool:
    """Whether activations must be quantized to 7 bits instead of 8. fbgemm's AVX2 and plain AVX-512 kernels sum
    pairs of u8×s8 products in int16, which 8-bit activations can overflow; with VNNI they accumulate in int32
    and cannot. Rather than trust CPU flags, one product that would overflow is run with 8 bits: where it comes
    out right, 8 bits are used (on this repository's VNNI machine they halve Int8Linear's error, 0.015 → 0.008);
    elsewhere 7 bits, as PyTorch's own dynamic quantization does on x86. qnnpack (ARM) always takes 8."""
    if torch.backends.quantized.engine not in ("fbgemm", "x86"):
        return False
    k = 64
    weight = torch.ones(2, k)  # row 0 all +1, row 1 all -1: every product of a pair at the int8 extreme
    weight[1] = -1.0
    packed = _pack(weight)
    x = torch.ones(2, k)  # [1, ..., 1] quantizes to 255 over the range [-1, 1]: 2 × 255 × 127 > 32767
    x[1] = -1.0
    y = torch.ops.quantized.linear_dynamic(x, packed, False)  # exact: [[64, -64], [-64, 64]]
    return not torch.allclose(y, x @ weight.T, rtol=0.02)


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights: x [..., in] float32 → [..., out] float32."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        try:
            self._packed = _pack(weight)
        except (AttributeError, RuntimeError) as e:  # no quantized engine in this build, or the ops removed
            raise ModelLoadError(f"int8 weights are not supported by this PyTorch ({e}); use float32") from e
        self._reduce = _reduce_range()
        self.bias = None if bias is None else bias.detach().float()  # added after the row scales: [out]
        self._range_row = torch.zeros(1, self.in_features)  # [1, in]: 1 and -1, appended to every input (forward)
        self._range_row[0, 0], self._range_row[0, -1] = 1.0, -1.0

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        # fbgemm quantizes its whole input with one range, from its minimum to its maximum. Each row (a sequence
        # of a batched decode step, an encoder frame) is scaled to a maximum |x| of 1 first and back after
        # (W·(x/s))·s = W·x, so each gets the whole range, as CTranslate2's int8 does. With one scale, base looped
        # on the Korean dev clip (CER 12.9 against float32's 0.21) and lost 0.1 CER on Spanish and Italian.
        # A last row of 1 and -1 pins that range to [-1, 1] in every call, one row or many. Without it a row's
        # quantization depended on the rows beside it, and so a transcript on what else the engine ran: the
        # encoder's output for a test clip's window moved by up to 3.4 (tiny.en; 8.8 for base) with two other
        # windows batched with it, and of the 23 English dev clips and the long-form file, 12 (tiny.en) and 15
        # (base) decoded other tokens alone than all at once (3 now; float32: none). It costs a single row
        # ~17 us a projection and 0.12 ms for base's logits (2 cores; the long-form file's time moved within noise).
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [..., 1]
        rows = torch.cat((x.reshape(-1, self.in_features), self._range_row))  # [rows + 1, in]: x's one copy
        rows[:-1].div_(scale.reshape(-1, 1))
        y = torch.ops.quantized.linear_dynamic(rows, self._packed, self._reduce)[:-1]  # [rows, out]
        y = y.view(*x.shape[:-1], self.out_features)
        return y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantize_linears(module: nn.Module) -> None:
    """Swap every `nn.Linear` below `module` for an `Int8Linear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.of(child))
        else:
            quantize_linears(child)
