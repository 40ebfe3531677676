"""Hugging Face transformers Whisper directories: config.json + safetensors (single or sharded) or .bin.

Safetensors is parsed here (8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets: [begin, end]}}`, then the raw data) so no extra package is needed.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from halkspeech.errors import ModelLoadError
from halkspeech.model.ct2 import map_file, parse_heads, tensor_at
from halkspeech.model.dims import ModelDims
from halkspeech.model.openai_pt import torch_load

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_hf_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any((directory / f).is_file() for f in _WEIGHT_FILES)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, backed by a copy-on-write mapping of it."""
    buf = map_file(path)
    if len(buf) < 8:
        raise ModelLoadError(f"{path} is truncated (no header)")
    (header_len,) = struct.unpack_from("<Q", buf, 0)
    if 8 + header_len > len(buf):
        raise ModelLoadError(f"{path} is truncated or not safetensors (header of {header_len} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a safetensors file (bad header)") from exc
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path} has a malformed header entry for {name}") from exc
        if dtype is None or end - begin != math.prod(shape) * dtype.itemsize or start + end > len(buf):
            raise ModelLoadError(f"{path} is truncated or corrupt at tensor {name}")
        tensors[name] = tensor_at(buf, start + begin, dtype, shape)
    return tensors


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    data = torch_load(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a state dict")
    return dict(data)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint, preferring safetensors, following shard indexes."""
    for single, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (directory / single).is_file():
            return reader(directory / single)
        index = directory / f"{single}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"{index} is not a valid shard index") from exc
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise ModelLoadError(f"{directory} lacks the shard {shard} named in {index.name}")
                tensors |= reader(directory / shard)
            return tensors
    raise ModelLoadError(f"{directory} has no model.safetensors or pytorch_model.bin")


# HF module inside a layer -> OpenAI module inside a block.
_LAYER_MODULES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_TOP = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.embed_tokens": "decoder.token_embedding",
    "decoder.layer_norm": "decoder.ln",
}
_POSITIONS = {
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
}
_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)")


def to_openai(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF keys (with or without the `model.` prefix) to OpenAI's; proj_out is tied and skipped."""
    state_dict: dict[str, torch.Tensor] = {}
    for hf_name, tensor in tensors.items():
        name = hf_name.removeprefix("model.")
        if name in _POSITIONS:
            state_dict[_POSITIONS[name]] = tensor
        elif match := _LAYER.fullmatch(name):
            side, index, module, param = match.groups()
            if module in _LAYER_MODULES:
                state_dict[f"{side}.blocks.{index}.{_LAYER_MODULES[module]}.{param}"] = tensor
        else:
            module, _, param = name.rpartition(".")
            if module in _TOP:
                state_dict[f"{_TOP[module]}.{param}"] = tensor
    return state_dict


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def dims_from_config(config: dict[str, Any], path: Path) -> ModelDims:
    if config.get("model_type") != "whisper":
        raise ModelLoadError(f"{path}: model_type is {config.get('model_type')!r}, not 'whisper'")
    keys = {
        "n_mels": "num_mel_bins",
        "n_audio_ctx": "max_source_positions",
        "n_audio_state": "d_model",
        "n_audio_head": "encoder_attention_heads",
        "n_audio_layer": "encoder_layers",
        "n_vocab": "vocab_size",
        "n_text_ctx": "max_target_positions",
        "n_text_state": "d_model",
        "n_text_head": "decoder_attention_heads",
        "n_text_layer": "decoder_layers",
    }
    missing = sorted({hf for hf in keys.values() if not isinstance(config.get(hf), int)})
    if missing:
        raise ModelLoadError(f"{path} lacks integer {', '.join(missing)}")
    return ModelDims(**{ours: config[hf] for ours, hf in keys.items()})


def load_hf(directory: Path) -> tuple[ModelDims, dict[str, torch.Tensor], tuple[tuple[int, int], ...] | None]:
    """Dims from config.json, OpenAI-named state dict, alignment heads from generation_config.json."""
    dims = dims_from_config(_json(directory / "config.json"), directory / "config.json")
    generation = directory / "generation_config.json"
    heads = parse_heads(_json(generation).get("alignment_heads"), generation) if generation.is_file() else None
    return dims, to_openai(read_tensors(directory)), heads
