"""CTranslate2 (faster-whisper) model directories, read without ctranslate2.

model.bin layout (little-endian), as written by ctranslate2/specs/model_spec.py:
  uint32 binary version
  [version >= 2] string spec name, uint32 spec revision
  uint32 variable count; per variable: string name, uint8 rank, rank x uint32 dims,
      [version >= 4] uint8 dtype id | [version < 4] uint8 item size, uint32 byte count, raw data
  [version >= 3] uint32 alias count; pairs of strings (alias, target)
where a string is a uint16 length (including a trailing NUL) and the bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections import Counter
from pathlib import Path

import torch

from halkspeech.errors import ModelLoadError
from halkspeech.model.dims import ModelDims

SUPPORTED_VERSIONS = range(1, 7)  # 6 is what CTranslate2 4.x writes
DTYPE_IDS = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
ITEM_SIZES = {4: torch.float32, 2: torch.float16, 1: torch.int8}  # versions < 4 store only the item size


def map_file(path: Path) -> mmap.mmap:
    """A private copy-on-write mapping: torch.frombuffer wants a writable buffer, and nothing is copied."""
    with path.open("rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as exc:  # an empty file cannot be mapped
            raise ModelLoadError(f"{path} is empty") from exc


def tensor_at(buf: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buf[offset:]`: a view when aligned, else an aligned copy (CT2 offsets are often odd)."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if offset % dtype.itemsize == 0:
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=count * dtype.itemsize, offset=offset)
    return raw.clone().view(dtype).reshape(shape)


class _Reader:
    """Bounds-checked reads from a mapped model.bin; any overrun is a truncated file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> int:
        if self.pos + n > len(self.buf):
            raise ModelLoadError(
                f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, the file has {len(self.buf)}"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        return int(struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0])

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).rstrip(b"\0").decode()
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{self.path} is corrupt: {what} is not text at offset {start}") from exc


def read_model_bin(path: Path) -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 model.bin by name (aliases resolved), backed by the file mapping."""
    reader = _Reader(map_file(path), path)
    version = reader.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{path} is not a CTranslate2 model of a supported binary version "
            f"(found {version}, supported {SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1})"
        )
    if version >= 2:
        spec = reader.string("the spec name")
        reader.unpack("I", "the spec revision")
        if spec and spec != "WhisperSpec":
            raise ModelLoadError(f"{path} is a CTranslate2 {spec}, not a Whisper model")
    variables: dict[str, torch.Tensor] = {}
    for index in range(reader.unpack("I", "the variable count")):
        name = reader.string(f"variable {index}'s name")
        variables[name] = _read_variable(reader, name, version)
    if version >= 3:
        for _ in range(reader.unpack("I", "the alias count")):
            alias, target = reader.string("an alias"), reader.string("an alias target")
            if target in variables:
                variables[alias] = variables[target]
    return variables


def _read_variable(reader: _Reader, name: str, version: int) -> torch.Tensor:
    rank = reader.unpack("B", name)
    shape = tuple(reader.unpack("I", name) for _ in range(rank))
    code = reader.unpack("B", name)
    dtype = (DTYPE_IDS if version >= 4 else ITEM_SIZES).get(code)
    if dtype is None:
        raise ModelLoadError(f"{reader.path} is corrupt: variable {name} has an unknown type code {code}")
    nbytes = reader.unpack("I", name)
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise ModelLoadError(f"{reader.path} is corrupt: variable {name} {shape} has {nbytes} bytes")
    return tensor_at(reader.buf, reader.take(nbytes, name), dtype, shape)


# CT2 module (after "encoder/layer_{i}/" or "decoder/layer_{i}/") -> OpenAI module inside the block.
_BLOCK_MODULES = {
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp.0",
    "ffn/linear_1": "mlp.2",
}
# Fused projections, split along dim 0 in this order; the key bias CT2 adds is zero and dropped.
_FUSED = {"self_attention/linear_0": ("attn", "qkv"), "attention/linear_1": ("cross_attn", "kv")}
_PROJ = {"q": "query", "k": "key", "v": "value"}
_TOP_MODULES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/layer_norm": "decoder.ln",
    "decoder/embeddings": "decoder.token_embedding",
}
_POSITIONS = {
    "encoder/position_encodings/encodings": "encoder.positional_embedding",
    "decoder/position_encodings/encodings": "decoder.positional_embedding",
}
_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")


def to_openai(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename CT2 variables to OpenAI keys; scalars, scales and the aliased output projection are skipped."""
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in variables.items():
        if name in _POSITIONS:
            state_dict[_POSITIONS[name]] = tensor
            continue
        module, _, param = name.rpartition("/")
        if param not in _PARAMS:
            continue
        key_param = _PARAMS[param]
        layer = _LAYER.fullmatch(module)
        if layer is None:
            if module in _TOP_MODULES:
                state_dict[f"{_TOP_MODULES[module]}.{key_param}"] = tensor
            continue
        side, index, sub = layer.groups()
        prefix = f"{side}.blocks.{index}"
        if sub in _BLOCK_MODULES:
            state_dict[f"{prefix}.{_BLOCK_MODULES[sub]}.{key_param}"] = tensor
        elif sub in _FUSED:
            attn, parts = _FUSED[sub]
            for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
                if not (part == "k" and key_param == "bias"):
                    state_dict[f"{prefix}.{attn}.{_PROJ[part]}.{key_param}"] = chunk
    return state_dict


def dequantize(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn int8/int16 weights with a `<name>_scale` into floats: CT2 stores q = round(w * scale).

    The result takes the checkpoint's float type (the most common one among its float variables).
    """
    floats = Counter(t.dtype for n, t in variables.items() if t.is_floating_point() and not n.endswith("_scale"))
    float_dtype = floats.most_common(1)[0][0] if floats else torch.float32
    out = dict(variables)
    for name, tensor in variables.items():
        scale = variables.get(f"{name}_scale")
        if scale is None or tensor.is_floating_point():
            continue
        scale = scale.float()
        if scale.dim() == 1:  # per output row: [out_features] -> [out_features, 1, ...]
            scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))
        out[name] = (tensor.float() / scale).to(float_dtype)
    return out


def _scalar(variables: dict[str, torch.Tensor], name: str) -> int | None:
    tensor = variables.get(name)
    if tensor is None or tensor.numel() != 1 or tensor.is_floating_point():
        return None  # versions < 4 cannot tell an int16 scalar from a float16 one: fall back
    return int(tensor.item())


def dims_from(variables: dict[str, torch.Tensor], path: Path) -> ModelDims:
    """Dims from the tensor shapes and the num_heads scalars (else d / 64, Whisper's head size)."""
    needed = [
        "encoder/conv1/weight",
        "encoder/position_encodings/encodings",
        "decoder/embeddings/weight",
        "decoder/position_encodings/encodings",
    ]
    missing = [n for n in needed if n not in variables]
    if missing:
        raise ModelLoadError(f"{path} is not a Whisper model: no {', '.join(missing)}")
    d_audio, n_mels = variables["encoder/conv1/weight"].shape[:2]
    n_vocab, d_text = variables["decoder/embeddings/weight"].shape
    layers = {"encoder": 0, "decoder": 0}
    for name in variables:
        if match := _LAYER.fullmatch(name):
            layers[match[1]] = max(layers[match[1]], int(match[2]) + 1)
    audio_heads = _scalar(variables, "encoder/num_heads")
    text_heads = _scalar(variables, "decoder/num_heads")
    return ModelDims(
        n_mels=n_mels,
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=d_audio,
        n_audio_head=audio_heads if audio_heads and d_audio % audio_heads == 0 else d_audio // 64,
        n_audio_layer=layers["encoder"],
        n_vocab=n_vocab,
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=d_text,
        n_text_head=text_heads if text_heads and d_text % text_heads == 0 else d_text // 64,
        n_text_layer=layers["decoder"],
    )


def read_config(directory: Path) -> dict[str, object]:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} has model.bin but no config.json (a CTranslate2 model needs both)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return config


def parse_heads(value: object, source: Path) -> tuple[tuple[int, int], ...] | None:
    """`[[layer, head], ...]` from a config file, or None when absent."""
    if value is None:
        return None
    try:
        return tuple((int(layer), int(head)) for layer, head in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: alignment_heads is not a list of [layer, head] pairs") from exc


def load_ct2(
    directory: Path,
) -> tuple[ModelDims, dict[str, torch.Tensor], tuple[tuple[int, int], ...] | None]:
    """Dims, OpenAI-named state dict and the config's alignment heads (None if it names none)."""
    config = read_config(directory)
    variables = dequantize(read_model_bin(directory / "model.bin"))
    dims = dims_from(variables, directory / "model.bin")
    return dims, to_openai(variables), parse_heads(config.get("alignment_heads"), directory / "config.json")
