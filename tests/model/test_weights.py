"""Weights loaders: every format lands on OpenAI's state dict, checked against the reference model."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import whisper
from whisper.model import AudioEncoder, ModelDimensions, TextDecoder, Whisper

from halkspeech.errors import ModelLoadError, ModelNotFound
from halkspeech.model.dims import ALIGNMENT_HEADS, KNOWN_DIMS, ModelDims, canonical_name
from halkspeech.model.weights import LoadedWeights, expected_shapes, load_weights, random_weights

JFK_PHRASE = "ask not what your country can do for you"


# Real-model fixtures (tiny_en_dir, base_dir, tiny_en_weights, base_weights) live in tests/conftest.py.


# -- helpers ---------------------------------------------------------------------------------------


def decode_16k(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz via PyAV (the audio package is not ready yet)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
    with av.open(str(path)) as container:
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in frames])


def reference_model(weights: LoadedWeights) -> Whisper:
    model = Whisper(ModelDimensions(**weights.dims.as_dict()))
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval()


def reference_text(weights: LoadedWeights, audio_path: Path) -> str:
    result = reference_model(weights).transcribe(
        decode_16k(audio_path), fp16=False, language="en", temperature=0.0, condition_on_previous_text=False
    )
    return str(result["text"])


def normalised(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def reference_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Shapes of whisper.model.Whisper(dims).state_dict(), built on the meta device (no memory)."""
    with torch.device("meta"):  # Whisper itself cannot be built on meta (to_sparse); its halves can
        encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer)
    halves = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}
    return {f"{half}.{k}": tuple(v.shape) for half, sd in halves.items() for k, v in sd.items()}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected) or set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# -- a CTranslate2 writer (test only) --------------------------------------------------------------

_CT2_DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: Path,
    variables: dict[str, torch.Tensor],
    *,
    version: int = 6,
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
) -> None:
    """model.bin as ctranslate2/specs/model_spec.py writes it (item sizes instead of dtype ids below v4)."""
    out = [struct.pack("<I", version)]
    if version >= 2:
        out += [_string(spec), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, tensor in variables.items():
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        code = _CT2_DTYPE_IDS[tensor.dtype] if version >= 4 else tensor.element_size()
        out += [_string(name), struct.pack(f"<B{tensor.dim()}I", tensor.dim(), *tensor.shape)]
        out += [struct.pack("<BI", code, len(data)), data]
    if version >= 3:
        out.append(struct.pack("<I", len(aliases or {})))
        for alias, target in (aliases or {}).items():
            out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def openai_to_ct2(sd: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, torch.Tensor]:
    """The inverse of the loader's mapping: fused q/k/v (with CT2's zero key bias), gamma/beta norms."""
    out: dict[str, torch.Tensor] = {}

    def linear(ct2: str, *keys: str) -> None:
        out[f"{ct2}/weight"] = torch.cat([sd[f"{k}.weight"] for k in keys])
        biases = [sd.get(f"{k}.bias", torch.zeros_like(sd[f"{k}.weight"][:, 0])) for k in keys]
        out[f"{ct2}/bias"] = torch.cat(biases)

    def norm(ct2: str, key: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{key}.weight"], sd[f"{key}.bias"]

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    out["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for side, n_layers in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layers):
            ct2, key = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            linear(f"{ct2}/self_attention/linear_0", f"{key}.attn.query", f"{key}.attn.key", f"{key}.attn.value")
            linear(f"{ct2}/self_attention/linear_1", f"{key}.attn.out")
            norm(f"{ct2}/self_attention/layer_norm", f"{key}.attn_ln")
            if side == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{key}.cross_attn.query")
                linear(f"{ct2}/attention/linear_1", f"{key}.cross_attn.key", f"{key}.cross_attn.value")
                linear(f"{ct2}/attention/linear_2", f"{key}.cross_attn.out")
                norm(f"{ct2}/attention/layer_norm", f"{key}.cross_attn_ln")
            linear(f"{ct2}/ffn/linear_0", f"{key}.mlp.0")
            linear(f"{ct2}/ffn/linear_1", f"{key}.mlp.2")
            norm(f"{ct2}/ffn/layer_norm", f"{key}.mlp_ln")
    norm("encoder/layer_norm", "encoder.ln_post")
    norm("decoder/layer_norm", "decoder.ln")
    out["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    out["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    return out


def quantize(variables: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CTranslate2's quantisation of 2-D+ weights: q = round(w * scale), per row (int8) or global (int16)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in variables.items():
        if not (name.endswith("/weight") and tensor.dim() >= 2):
            out[name] = tensor
            continue
        w = tensor.float()
        if dtype == torch.int8:
            amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-6)
            scale = 127.0 / amax  # [out_features]
            q = torch.round(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
        else:
            scale = torch.tensor(2.0**10 / max(float(w.abs().max()), 1e-6))  # global scalar
            q = torch.round(w * scale)
        out[name] = q.to(dtype)
        out[f"{name}_scale"] = scale.float()
    return out


def write_ct2_dir(directory: Path, variables: dict[str, torch.Tensor], config: dict, **kwargs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_ct2(directory / "model.bin", variables, **kwargs)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# -- CTranslate2: the real models ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("tiny.en", (384, 6, 4, 4, 51864, 80)),
        ("base", (512, 8, 6, 6, 51865, 80)),
    ],
)
def test_real_ct2_models_load_complete_and_transcribe(
    request: pytest.FixtureRequest, jfk_path: Path, name: str, dims: tuple[int, ...]
) -> None:
    directory: Path = request.getfixturevalue(f"{name.replace('.', '_')}_dir")
    weights: LoadedWeights = request.getfixturevalue(f"{name.replace('.', '_')}_weights")
    d = weights.dims
    assert (d.n_audio_state, d.n_audio_head, d.n_audio_layer, d.n_text_layer, d.n_vocab, d.n_mels) == dims
    assert d == KNOWN_DIMS[name]
    assert weights.name == name
    assert weights.source == f"CTranslate2 directory {directory.absolute()}"
    config_heads = json.loads((directory / "config.json").read_text())["alignment_heads"]
    assert weights.alignment_heads == tuple(map(tuple, config_heads))
    shapes = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    assert shapes == reference_shapes(d)
    assert {v.dtype for v in weights.state_dict.values()} == {torch.float16}
    assert "decoder.blocks.0.cross_attn.key.bias" not in weights.state_dict
    assert JFK_PHRASE in normalised(reference_text(weights, jfk_path))


def test_ct2_name_from_dims_when_directory_name_is_not_a_model(tiny_en_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_en_dir, tmp_path / "model")
    weights = load_weights(copy / "model.bin")  # a file path means its directory
    assert weights.name == "tiny.en"


# -- CTranslate2: versions, quantisation, corruption -----------------------------------------------


@pytest.mark.parametrize(
    ("version", "quant"),
    [(6, None), (6, torch.int16), (5, torch.int8), (4, torch.int8), (3, None), (3, torch.int8)],
)
def test_ct2_versions_and_dequantisation(
    tiny_en_weights: LoadedWeights, tmp_path: Path, version: int, quant: torch.dtype | None
) -> None:
    original = tiny_en_weights.state_dict
    variables = openai_to_ct2(original, tiny_en_weights.dims)
    if quant is not None:
        variables = quantize(variables, quant)
    if version >= 4:  # v3 item sizes cannot tell int16 scalars from float16 ones: the loader falls back to d/64
        variables |= {n: torch.tensor(6, dtype=torch.int16) for n in ("encoder/num_heads", "decoder/num_heads")}
    heads = [[2, 3], [3, 1]]
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    directory = write_ct2_dir(tmp_path / "m", variables, {"alignment_heads": heads}, version=version, aliases=aliases)

    weights = load_weights(directory)
    assert weights.dims == tiny_en_weights.dims
    assert weights.alignment_heads == ((2, 3), (3, 1))
    assert set(weights.state_dict) == set(original)
    assert {v.dtype for v in weights.state_dict.values()} == {torch.float16}
    for key, tensor in original.items():
        loaded = weights.state_dict[key]
        ct2_name = "decoder/embeddings/weight" if key == "decoder.token_embedding.weight" else None
        if quant is None or tensor.dim() < 2 or "positional" in key:
            assert torch.equal(loaded, tensor), key
        elif ct2_name:  # check the exact dequantisation on one directly-mapped tensor
            q, scale = variables[ct2_name], variables[f"{ct2_name}_scale"]
            expected = (q.float() / (scale[:, None] if scale.dim() else scale)).half()
            assert torch.equal(loaded, expected)
        amax = float(tensor.float().abs().max())
        step = amax / 127 if quant == torch.int8 else amax / 1024  # rounding, then fp16 rounding below
        assert (loaded.float() - tensor.float()).abs().max() <= step + amax * 2**-10, key


def test_int8_ct2_model_still_transcribes(tiny_en_weights: LoadedWeights, tmp_path: Path, jfk_path: Path) -> None:
    variables = quantize(openai_to_ct2(tiny_en_weights.state_dict, tiny_en_weights.dims), torch.int8)
    weights = load_weights(write_ct2_dir(tmp_path / "int8", variables, {}, version=5))
    assert weights.alignment_heads == ALIGNMENT_HEADS["tiny.en"]  # none in config.json: the catalog's
    assert JFK_PHRASE in normalised(reference_text(weights, jfk_path))


def _truncate(directory: Path) -> None:
    data = (directory / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(data[: len(data) // 2])


def _bad_version(directory: Path) -> None:
    data = (directory / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(struct.pack("<I", 7) + data[4:])


def _garbage(directory: Path) -> None:
    (directory / "model.bin").write_bytes(np.random.default_rng(0).bytes(4096))


def _not_whisper(directory: Path) -> None:
    write_ct2(directory / "model.bin", {"x/weight": torch.ones(2, 2)}, spec="TransformerSpec")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate, "is truncated"),
        (_bad_version, "found 7, supported 1-6"),
        (_garbage, "model.bin"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model.bin").write_bytes(b""), "is empty"),
        (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
        (_not_whisper, "TransformerSpec, not a Whisper model"),
    ],
)
def test_corrupt_ct2_gives_one_line_model_load_error(tiny_en_dir: Path, tmp_path: Path, corrupt, message: str) -> None:
    directory = shutil.copytree(tiny_en_dir, tmp_path / "m")
    corrupt(directory)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_weights(directory)
    assert "\n" not in str(info.value)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such file"):
        load_weights(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="holds no Whisper model"):
        load_weights(tmp_path)


# -- OpenAI .pt ------------------------------------------------------------------------------------


def test_openai_pt_round_trip(tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    path = tmp_path / "tiny.en.pt"
    torch.save({"dims": tiny_en_weights.dims.as_dict(), "model_state_dict": tiny_en_weights.state_dict}, path)
    weights = load_weights(path)
    assert weights.dims == tiny_en_weights.dims
    assert weights.name == "tiny.en"
    assert weights.alignment_heads == ALIGNMENT_HEADS["tiny.en"]
    assert weights.source == f"OpenAI checkpoint {path}"
    assert_same_state(weights.state_dict, tiny_en_weights.state_dict)
    assert load_weights(tmp_path).name == "tiny.en"  # a directory holding one .pt


def test_openai_pt_legacy_format_and_fork_heads(tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    checkpoint = {"dims": tiny_en_weights.dims.as_dict(), "model_state_dict": tiny_en_weights.state_dict}
    path = tmp_path / "finetune.pt"
    torch.save({**checkpoint, "alignment_heads": [[3, 0], [3, 5]]}, path, _use_new_zipfile_serialization=False)
    weights = load_weights(path)
    assert weights.alignment_heads == ((3, 0), (3, 5))
    assert_same_state(weights.state_dict, tiny_en_weights.state_dict)
    # OpenAI's own encoding of the heads (base85 of a gzipped bool array), as in whisper._ALIGNMENT_HEADS
    torch.save({**checkpoint, "alignment_heads": whisper._ALIGNMENT_HEADS["tiny.en"]}, path)
    assert load_weights(path).alignment_heads == ALIGNMENT_HEADS["tiny.en"]


def test_incomplete_or_misshaped_state_dict_names_the_keys(tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    sd = dict(tiny_en_weights.state_dict)
    del sd["decoder.blocks.2.cross_attn.value.bias"]
    sd["encoder.conv1.weight"] = sd["encoder.conv1.weight"][:, :40]
    sd["decoder.proj.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"dims": tiny_en_weights.dims.as_dict(), "model_state_dict": sd}, path)
    with pytest.raises(ModelLoadError) as info:
        load_weights(path)
    message = str(info.value)
    assert "missing: decoder.blocks.2.cross_attn.value.bias" in message
    assert "unexpected: decoder.proj.weight" in message
    assert "encoder.conv1.weight (384, 40, 3) (expected (384, 80, 3))" in message
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint: those are zip archives or pickles"):
        load_weights(path)  # not "... checkpoint: 101", the unpickler's opcode error
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        load_weights(path)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"n_text_head": 5, "n_audio_head": 5}, "n_audio_state 384 is not a multiple of n_audio_head 5"),
        ({"n_text_head": 0}, "n_text_head is 0"),
        ({"n_vocab": 1000}, "n_vocab is 1000, not one of Whisper's vocabularies"),
        ({"n_mels": 64}, "n_mels is 64, not 80 or 128"),
        # loaded, then every request failed in the cross-attention (a 500 each)
        ({"n_text_state": 512, "n_text_head": 8}, "n_audio_state 384 is not n_text_state 512"),
        # loaded, then every transcript was cut after a few words ("And so my fellow Americans ask not")
        ({"n_text_ctx": 16}, "n_text_ctx is 16, fewer than Whisper's 448"),
        # 10**8 (a 1 KB config.json) built keys until memory ran out; 10**5 is slow enough to show it
        ({"n_audio_layer": 100_000}, "n_audio_layer is 100000, more than 256"),
    ],
)
def test_dims_no_whisper_can_run_with_are_load_errors(
    tiny_en_weights: LoadedWeights, tmp_path: Path, changes: dict[str, int], says: str
) -> None:
    """The tensors' shapes do not show these: such a checkpoint loaded (health ok), then every request was a
    500 (a reshape into 5 heads of 384), or the load died of a ZeroDivisionError."""
    path = tmp_path / "odd.pt"
    torch.save({"dims": tiny_en_weights.dims.as_dict() | changes, "model_state_dict": tiny_en_weights.state_dict}, path)
    with pytest.raises(ModelLoadError, match=f"has dimensions Whisper cannot run with: .*{says}"):
        load_weights(path)


def test_an_empty_alignment_heads_list_means_the_defaults(tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    path = tmp_path / "tiny.en.pt"
    checkpoint = {"dims": tiny_en_weights.dims.as_dict(), "model_state_dict": tiny_en_weights.state_dict}
    torch.save({**checkpoint, "alignment_heads": []}, path)
    assert load_weights(path).alignment_heads == ALIGNMENT_HEADS["tiny.en"]


# -- Hugging Face transformers ---------------------------------------------------------------------

_HF_BLOCK = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_HF_TOP = {
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
    "decoder.ln.weight": "model.decoder.layer_norm.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}


def openai_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 has no convert_openai_to_hf any more: the inverse mapping, checked below by HF."""
    out = {}
    for key, tensor in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = tensor
        elif ".blocks." in key:
            side, _, index, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            out[f"model.{side}.layers.{index}.{_HF_BLOCK[module]}.{param}"] = tensor
        else:  # conv1 / conv2
            out[f"model.{key}"] = tensor
    out["proj_out.weight"] = sd["decoder.token_embedding.weight"]  # tied
    return out


@pytest.fixture(scope="module")
def hf_model(tiny_en_weights: LoadedWeights):
    transformers = pytest.importorskip("transformers")
    d = tiny_en_weights.dims
    config = transformers.WhisperConfig(
        vocab_size=d.n_vocab,
        num_mel_bins=d.n_mels,
        d_model=d.n_audio_state,
        encoder_layers=d.n_audio_layer,
        decoder_layers=d.n_text_layer,
        encoder_attention_heads=d.n_audio_head,
        decoder_attention_heads=d.n_text_head,
        encoder_ffn_dim=4 * d.n_audio_state,
        decoder_ffn_dim=4 * d.n_text_state,
        max_source_positions=d.n_audio_ctx,
        max_target_positions=d.n_text_ctx,
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    hf_sd = {k: v.float() for k, v in openai_to_hf(tiny_en_weights.state_dict).items()}
    result = model.load_state_dict(hf_sd, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.generation_config.alignment_heads = [[1, 0], [3, 4]]
    return model


def test_hf_mapping_is_transformers_own(hf_model, tiny_en_weights: LoadedWeights, jfk_path: Path) -> None:
    """Same logits as the reference on a real mel: the mapping in this test (and so its inverse) is HF's."""
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(decode_16k(jfk_path))))[None]
    tokens = torch.tensor([[50257, 50362, 843, 523, 616]])  # <|startoftranscript|><|notimestamps|> And so my
    reference = reference_model(tiny_en_weights)
    with torch.no_grad():
        expected = reference(mel, tokens)
        actual = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _expect_hf_load(directory: Path, original: LoadedWeights) -> None:
    weights = load_weights(directory)
    assert weights.dims == original.dims
    assert weights.name == "tiny.en"
    assert weights.alignment_heads == ((1, 0), (3, 4))
    assert weights.source == f"Hugging Face directory {directory}"
    assert_same_state(weights.state_dict, {k: v.float() for k, v in original.state_dict.items()})


def test_hf_safetensors_round_trip(hf_model, tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors").is_file()
    _expect_hf_load(tmp_path / "st", tiny_en_weights)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _expect_hf_load(tmp_path / "sharded", tiny_en_weights)


def test_hf_pytorch_bin_round_trip(hf_model, tiny_en_weights: LoadedWeights, tmp_path: Path) -> None:
    # transformers 5 only saves safetensors; a .bin checkpoint is its state dict under torch.save.
    directory = tmp_path / "bin"
    hf_model.config.save_pretrained(directory)
    hf_model.generation_config.save_pretrained(directory)
    torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")
    from transformers import WhisperForConditionalGeneration

    reloaded = WhisperForConditionalGeneration.from_pretrained(directory)
    assert torch.equal(reloaded.model.encoder.conv1.weight, hf_model.model.encoder.conv1.weight)
    _expect_hf_load(directory, tiny_en_weights)


def test_hf_config_must_be_whisper(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(ModelLoadError, match="not 'whisper'"):
        load_weights(tmp_path)


# -- random weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({canonical_name(n) for n in KNOWN_DIMS}))
def test_random_weights_have_the_catalog_shapes(name: str) -> None:
    weights = random_weights(name, device="meta", dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    assert shapes == expected_shapes(KNOWN_DIMS[name]) == reference_shapes(KNOWN_DIMS[name])
    assert {v.dtype for v in weights.state_dict.values()} == {torch.bfloat16}
    assert weights.dims == KNOWN_DIMS[name]
    assert "benchmarking only" in weights.source


def test_random_weights_are_deterministic_and_loadable() -> None:
    a = random_weights("tiny", dtype=torch.float32, seed=1)
    b = random_weights("tiny", dtype=torch.float32, seed=1)
    c = random_weights("tiny", dtype=torch.float32, seed=2)
    assert_same_state(a.state_dict, b.state_dict)
    assert not torch.equal(a.state_dict["decoder.blocks.0.mlp.0.weight"], c.state_dict["decoder.blocks.0.mlp.0.weight"])
    w = a.state_dict["encoder.blocks.1.attn.query.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.001
    assert torch.equal(a.state_dict["decoder.ln.weight"], torch.ones(384))
    assert torch.equal(a.state_dict["encoder.blocks.0.mlp.0.bias"], torch.zeros(1536))
    torch.testing.assert_close(a.state_dict["encoder.positional_embedding"], whisper.model.sinusoids(1500, 384))
    assert a.alignment_heads == ALIGNMENT_HEADS["tiny"]
    reference_model(a)  # strict load into the reference
    with pytest.raises(ModelNotFound, match="no model named"):
        random_weights("huge-v9")


# -- malformed files of a known format: one-line ModelLoadError, never a traceback ---------------------------------


def _hf_config(directory: Path, dims: ModelDims) -> None:
    directory.mkdir()
    config = {
        "model_type": "whisper",
        "num_mel_bins": dims.n_mels,
        "max_source_positions": dims.n_audio_ctx,
        "d_model": dims.n_audio_state,
        "encoder_attention_heads": dims.n_audio_head,
        "encoder_layers": dims.n_audio_layer,
        "vocab_size": dims.n_vocab,
        "max_target_positions": dims.n_text_ctx,
        "decoder_attention_heads": dims.n_text_head,
        "decoder_layers": dims.n_text_layer,
    }
    (directory / "config.json").write_text(json.dumps(config))


def _safetensors(directory: Path, header: object, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _st_header_list(w: LoadedWeights, d: Path) -> Path:
    _hf_config(d, w.dims)
    _safetensors(d, [1, 2])
    return d


def _st_negative_shape(w: LoadedWeights, d: Path) -> Path:
    _hf_config(d, w.dims)
    _safetensors(d, {"model.encoder.conv1.bias": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, bytes(8))
    return d


def _st_negative_offset(w: LoadedWeights, d: Path) -> Path:
    _hf_config(d, w.dims)
    header = {"model.encoder.conv1.bias": {"dtype": "F32", "shape": [2], "data_offsets": [-999, -991]}}
    _safetensors(d, header, bytes(8))
    return d


def _shard_index_values_not_names(w: LoadedWeights, d: Path) -> Path:
    _hf_config(d, w.dims)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 1, "b": "x.safetensors"}}))
    return d


def _hf_bin_value_not_a_tensor(w: LoadedWeights, d: Path) -> Path:
    _hf_config(d, w.dims)
    torch.save({"model.encoder.conv1.bias": [1, 2]}, d / "pytorch_model.bin")
    return d


def _ct2_variable(name: str, change) -> Callable[[LoadedWeights, Path], Path]:
    def make(w: LoadedWeights, d: Path) -> Path:
        variables = openai_to_ct2(w.state_dict, w.dims)
        variables[name] = change(variables[name])
        return write_ct2_dir(d, variables, {})

    return make


def _pt_heads(raw: bytes) -> Callable[[LoadedWeights, Path], Path]:
    def make(w: LoadedWeights, d: Path) -> Path:
        d.mkdir()
        heads = base64.b85encode(raw)
        torch.save({"dims": w.dims.as_dict(), "model_state_dict": w.state_dict, "alignment_heads": heads}, d / "m.pt")
        return d / "m.pt"

    return make


_BAD_DEFLATE = bytearray(gzip.compress(bytes(range(24))))
_BAD_DEFLATE[12:16] = b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "make",
    [
        _st_header_list,  # AttributeError: 'list' object has no attribute 'items'
        _st_negative_shape,  # RuntimeError: invalid shape dimension -2
        _st_negative_offset,  # ValueError from torch.frombuffer
        _shard_index_values_not_names,  # TypeError: '<' not supported between 'str' and 'int'
        _hf_bin_value_not_a_tensor,  # AttributeError: 'list' object has no attribute 'shape'
        _ct2_variable("encoder/conv1/weight", lambda t: t.reshape(-1)),  # ValueError: not enough values to unpack
        _ct2_variable("decoder/embeddings/weight", lambda t: t[None]),  # ValueError: too many values to unpack
        _ct2_variable("encoder/position_encodings/encodings", lambda t: t[0, 0]),  # IndexError
        _ct2_variable("decoder/layer_0/self_attention/linear_0/weight", lambda t: t[:2]),  # zip(strict=True)
        _ct2_variable("decoder/layer_0/attention/linear_1/bias", lambda t: t[0]),  # chunk of a scalar
        _pt_heads(gzip.compress(bytes(24))[:-6]),  # EOFError: a cut gzip stream
        _pt_heads(bytes(_BAD_DEFLATE)),  # zlib.error
    ],
)
def test_malformed_files_are_one_line_load_errors(tiny_en_weights: LoadedWeights, tmp_path: Path, make) -> None:
    """Each of these was a raw traceback from `halkspeech transcribe` and stopped `halkspeech models pull` (which
    re-fetches a corrupt cached copy) before it fetched anything."""
    path = make(tiny_en_weights, tmp_path / "m")
    with pytest.raises(ModelLoadError) as info:
        load_weights(path)
    assert str(tmp_path / "m") in str(info.value)
    assert "\n" not in str(info.value)


def test_a_path_that_is_neither_file_nor_directory_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="neither a file nor a directory"):
        load_weights(Path("/dev/null"))  # was NotADirectoryError from iterdir


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda t: t.to(torch.int8), "decoder.token_embedding.weight (int8)"),  # was a traceback building the model
        (lambda t: t.bool(), "decoder.token_embedding.weight (bool)"),
        (lambda t: t.float().to_sparse(), "decoder.token_embedding.weight (sparse float32)"),  # was a 500 per request
    ],
)
def test_weights_must_be_dense_float_tensors(tiny_en_weights: LoadedWeights, tmp_path: Path, change, says: str) -> None:
    sd = dict(tiny_en_weights.state_dict)
    sd["decoder.token_embedding.weight"] = change(sd["decoder.token_embedding.weight"])
    path = tmp_path / "m.pt"
    torch.save({"dims": tiny_en_weights.dims.as_dict(), "model_state_dict": sd}, path)
    with pytest.raises(ModelLoadError, match=rf"not a dense float tensor: {re.escape(says)}"):
        load_weights(path)


def test_a_weights_file_its_directory_does_not_read_is_refused(hf_model, tmp_path: Path) -> None:
    """`dir/finetuned.safetensors` loaded dir/model.safetensors without a word: the file named was never read."""
    hf_model.save_pretrained(tmp_path / "st")
    (tmp_path / "st" / "finetuned.safetensors").write_bytes(b"not even safetensors")
    with pytest.raises(
        ModelLoadError, match=r"finetuned\.safetensors is not a file its directory loads \(it loads model"
    ):
        load_weights(tmp_path / "st" / "finetuned.safetensors")
    assert load_weights(tmp_path / "st" / "model.safetensors").name == "tiny.en"  # the file it reads: still its dir
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20MB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    assert load_weights(shard).name == "tiny.en"


def test_a_weights_file_without_its_config_names_the_missing_config(tmp_path: Path) -> None:
    """It said "its directory loads nothing; give a directory that holds it under that name", which it was."""
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(ModelLoadError, match="holds no model that reads it: a Hugging Face weights file needs config"):
        load_weights(tmp_path / "model.safetensors")


def test_a_read_that_fails_is_not_called_corrupt(tiny_en_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PermissionError (or EIO) said "is corrupt or not a Whisper model", and the registry said to pull again."""

    def denied(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("halkspeech.model.ct2.map_file", denied)
    with pytest.raises(
        ModelLoadError, match=r"could not be read \(PermissionError: \[Errno 13\] Permission denied"
    ) as info:
        load_weights(tiny_en_dir)
    assert "corrupt" not in str(info.value)
