"""Host↔device copies that do not make the engine thread wait for the device.

`torch.tensor(values, device="cuda")` (and indexing a CUDA tensor with a Python list) builds the values in
pageable host memory and copies them with non_blocking=False, which synchronises the stream first: the engine
thread waits for every kernel queued before it (an inline encoder run: tens of ms), and the GPU then idles
while the thread prepares its next launches. An admission made ~16 such copies. From pinned memory a copy is
queued on the stream like a kernel; reading results back costs one wait for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IntRows = Sequence[int] | Sequence[Sequence[int]]


def to_device(values: IntRows | Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values → a tensor on `device`, queued on the current stream (nothing waits for the device)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def queue_to_host(*tensors: Tensor | None) -> list[Tensor | None]:
    """Device tensors → copies into pinned host memory, queued on the current stream (valid once the work
    queued so far has run); on a CPU, the tensors themselves."""
    out: list[Tensor | None] = []
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cuda":
            out.append(tensor)
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        out.append(host)
    return out


@dataclass
class HostCopies:
    """Device tensors on their way to the host: `wait()` returns them once the copies have run."""

    tensors: list[Tensor]
    done: torch.cuda.Event | None  # None on a CPU: the tensors are the results

    @classmethod
    def queue(cls, *tensors: Tensor) -> HostCopies:
        copies = [t for t in queue_to_host(*tensors) if t is not None]
        done = None
        if any(t.device.type == "cuda" for t in tensors):
            done = torch.cuda.Event()
            done.record()
        return cls(copies, done)

    def wait(self) -> list[Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors
