"""CUDA C++ compiled at run time: NVRTC to a cubin, loaded and launched through the driver API (ctypes). The
absorbed cross-attention (model/absorbed.py) is the one kernel that needs it; written for session 9's persistent
step (commit daf5118).

NVRTC ships with PyTorch's CUDA wheels (the nvidia-cuda-nvrtc package), so this needs no CUDA toolkit, no host
compiler and no build step. Compiling needs no GPU: with the nvidia-cuda-nvrtc wheel on sys.path a CPU machine
checks that a kernel's source compiles.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
from collections.abc import Sequence

import torch

_NVRTC_SUCCESS = 0
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CudaRtcError(RuntimeError):
    """NVRTC or the CUDA driver refused a kernel: not found, not compiled, not loaded or not launched."""


@functools.cache
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library: the one a CUDA build of PyTorch loads, else one from an nvidia-cuda-nvrtc wheel."""
    names = [f"libnvrtc.so.{v}" for v in ("13", "12")] + ["libnvrtc.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for base in sys.path:  # the wheels keep it under nvidia/cu13/lib or nvidia/cuda_nvrtc/lib
        for path in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True):
            if "builtins" in path or "alt" in path:
                continue
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    raise CudaRtcError("NVRTC (libnvrtc) not found: install a CUDA build of PyTorch or nvidia-cuda-nvrtc")


def available() -> bool:
    try:
        nvrtc()
    except CudaRtcError:
        return False
    return True


def compile_cubin(source: str, name: str, arch: str, defines: dict[str, int | str]) -> bytes:
    """`source` compiled for `arch` (e.g. "sm_90") with -D defines → a cubin (raises CudaRtcError with the log)."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _nvrtc_check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None))
    try:
        options = [f"--gpu-architecture={arch}", "--std=c++17"]
        options += [f"-D{key}={value}" for key, value in defines.items()]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        if lib.nvrtcCompileProgram(prog, len(options), argv) != _NVRTC_SUCCESS:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaRtcError(f"{name}: NVRTC failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _nvrtc_check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(lib, lib.nvrtcGetCUBIN(prog, cubin))
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_check(lib: ctypes.CDLL, result: int) -> None:
    if result != _NVRTC_SUCCESS:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaRtcError(f"NVRTC error {result}: {lib.nvrtcGetErrorString(result).decode()}")


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        lib = _driver()
        text = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(text))
        raise CudaRtcError(f"{what}: CUDA error {result} ({(text.value or b'?').decode()})")


class Kernel:
    """A kernel loaded into the current CUDA context (PyTorch's primary context), launched on PyTorch's stream.
    Arguments are tensors (their data pointers) or ints (passed as 64-bit `long long`)."""

    def __init__(self, cubin: bytes, name: str, shared_bytes: int) -> None:
        torch.cuda.init()
        lib = _driver()
        self._module = ctypes.c_void_p()
        self._function = ctypes.c_void_p()
        self._cubin = ctypes.create_string_buffer(cubin)  # kept alive with the module
        _check(lib.cuModuleLoadData(ctypes.byref(self._module), self._cubin), f"loading {name}")
        _check(lib.cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()), name)
        self.shared_bytes = shared_bytes
        _check(
            lib.cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes),
            f"{name}: {shared_bytes} bytes of shared memory",
        )
        self.name = name

    def launch(self, grid: tuple[int, int, int], block: int, args: Sequence[torch.Tensor | int]) -> None:
        """One launch of a grid of blocks of `block` threads on the current stream (captured when it is
        capturing). Tensors go as their data pointers, ints as 64-bit `long long`."""
        values: list[ctypes.c_void_p | ctypes.c_longlong] = [
            ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_longlong(a) for a in args
        ]
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        result = _driver().cuLaunchKernel(self._function, *grid, block, 1, 1, self.shared_bytes, stream, params, None)
        _check(result, f"launching {self.name}")

    def registers_and_local_bytes(self) -> tuple[int, int]:
        """Registers a thread and local memory a thread (spills) of the loaded kernel."""
        values = []
        for attribute in (4, 3):  # CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
            value = ctypes.c_int()
            _check(_driver().cuFuncGetAttribute(ctypes.byref(value), attribute, self._function), "attribute")
            values.append(value.value)
        return values[0], values[1]
