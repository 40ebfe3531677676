"""OpenAI `.pt` checkpoints: `{"dims": {...}, "model_state_dict": {...}}` as released with openai-whisper."""

from __future__ import annotations

import base64
import gzip
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from halkspeech.errors import ModelLoadError
from halkspeech.model.dims import ModelDims


def torch_load(path: Path) -> Any:
    """torch.load with weights_only (a checkpoint is data, never code) and mmap (no second copy) when the
    file is in the zip format; ModelLoadError if unreadable."""
    try:
        with open(path, "rb") as file:
            head = file.read(2)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if not (head == b"PK" or head[:1] == b"\x80"):  # neither a zip archive nor a pickle (protocol 2+)
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint: those are zip archives or pickles")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        pass  # legacy (pre-zip) serialization cannot be memory-mapped; read it normally below
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {reason}")


def _dims(raw: object, path: Path) -> ModelDims:
    names = [f.name for f in fields(ModelDims)]
    if not isinstance(raw, dict) or any(n not in raw for n in names):
        raise ModelLoadError(f"{path}: 'dims' must hold {', '.join(names)}")
    try:
        return ModelDims(**{n: int(raw[n]) for n in names})
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: 'dims' holds a non-integer value") from exc


def _heads(raw: object, dims: ModelDims) -> tuple[tuple[int, int], ...] | None:
    """Alignment heads some forks store: [[layer, head], ...], a bool [layers, heads] tensor, or OpenAI's
    base85-gzipped bool array (the format of whisper._ALIGNMENT_HEADS)."""
    if raw is None:
        return None
    if isinstance(raw, bytes | str):
        raw_bytes = gzip.decompress(base64.b85decode(raw))
        raw = torch.frombuffer(bytearray(raw_bytes), dtype=torch.bool).reshape(dims.n_text_layer, dims.n_text_head)
    if isinstance(raw, torch.Tensor):
        dense = raw.to_dense() if raw.is_sparse else raw
        return tuple((int(layer), int(head)) for layer, head in dense.nonzero().tolist())
    return tuple((int(layer), int(head)) for layer, head in raw)  # type: ignore[attr-defined]


def load_openai_pt(
    path: Path,
) -> tuple[ModelDims, dict[str, torch.Tensor], tuple[tuple[int, int], ...] | None]:
    """Dims, state dict (as stored) and alignment heads if the checkpoint carries any."""
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise ModelLoadError(f"{path} is not an OpenAI Whisper checkpoint (no 'dims' and 'model_state_dict')")
    dims = _dims(checkpoint["dims"], path)
    state_dict = checkpoint["model_state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelLoadError(f"{path}: 'model_state_dict' is not a mapping of tensors")
    try:
        heads = _heads(checkpoint.get("alignment_heads"), dims)
    except (TypeError, ValueError, RuntimeError, OSError, EOFError, zlib.error) as exc:  # EOF, zlib: cut or bad gzip
        raise ModelLoadError(f"{path}: unreadable alignment_heads ({exc})") from exc
    return dims, dict(state_dict), heads
