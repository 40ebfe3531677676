"""Hand-written GPU kernels (Triton) for the FP8 paths, each with a PyTorch reference of the same math.

The Triton versions run on CUDA when the `triton` package is importable (it ships with CUDA builds of
PyTorch); everywhere else the reference runs, which is also what the tests compare the kernels against
(on a CPU the kernels can run under Triton's interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def use_triton(device: torch.device) -> bool:
    """Triton on CUDA tensors, or anywhere when its interpreter is switched on (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
