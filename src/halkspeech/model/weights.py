"""One canonical form for Whisper weights, whatever format they came in.

Every loader (CTranslate2 directory, OpenAI `.pt`, Hugging Face directory) ends in `LoadedWeights`: a complete
state dict under OpenAI's checkpoint names and shapes (what `whisper.model.Whisper(dims).state_dict()` holds),
so the model and the reference implementation load the same dict with `strict=True`.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from halkspeech.errors import HalkSpeechError, ModelLoadError, ModelNotFound
from halkspeech.model import ct2, hf, openai_pt
from halkspeech.model.dims import KNOWN_DIMS, N_FRAMES, VOCAB_SIZES, ModelDims, alignment_heads_for, canonical_name

StateDict = dict[str, torch.Tensor]
MAX_LAYERS = 256  # encoder or decoder layers at most (the largest Whisper has 32)
MIN_TEXT_CTX = 448  # every Whisper's decoder positions: a prompt of up to 224 tokens, then up to 224 sampled
Heads = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LoadedWeights:
    """A complete Whisper checkpoint under OpenAI's names, on CPU (or `device` for random weights)."""

    dims: ModelDims
    state_dict: StateDict  # OpenAI names and shapes; dtype as stored (fp16/fp32/bf16)
    alignment_heads: Heads  # (decoder layer, head) pairs for word timings
    name: str  # catalog name if the dims match one, else the file or directory name
    source: str  # human-readable origin, for logs and `/v1/models`


def expected_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every key of `whisper.model.Whisper(dims).state_dict()` with its shape, in the same order."""
    da, dt = dims.n_audio_state, dims.n_text_state
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.positional_embedding": (dims.n_audio_ctx, da),
        "encoder.conv1.weight": (da, dims.n_mels, 3),
        "encoder.conv1.bias": (da,),
        "encoder.conv2.weight": (da, da, 3),
        "encoder.conv2.bias": (da,),
    }
    for i in range(dims.n_audio_layer):
        shapes |= _block(f"encoder.blocks.{i}", da, cross=False)
    shapes |= {"encoder.ln_post.weight": (da,), "encoder.ln_post.bias": (da,)}
    shapes["decoder.positional_embedding"] = (dims.n_text_ctx, dt)
    shapes["decoder.token_embedding.weight"] = (dims.n_vocab, dt)
    for i in range(dims.n_text_layer):
        shapes |= _block(f"decoder.blocks.{i}", dt, cross=True)
    shapes |= {"decoder.ln.weight": (dt,), "decoder.ln.bias": (dt,)}
    return shapes


def _block(prefix: str, d: int, *, cross: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in ("attn", "cross_attn") if cross else ("attn",):
        for proj in ("query", "key", "value", "out"):
            shapes[f"{prefix}.{attn}.{proj}.weight"] = (d, d)
            if proj != "key":  # OpenAI's key projection has no bias
                shapes[f"{prefix}.{attn}.{proj}.bias"] = (d,)
        shapes |= {f"{prefix}.{attn}_ln.weight": (d,), f"{prefix}.{attn}_ln.bias": (d,)}
    shapes |= {f"{prefix}.mlp.0.weight": (4 * d, d), f"{prefix}.mlp.0.bias": (4 * d,)}
    shapes |= {f"{prefix}.mlp.2.weight": (d, 4 * d), f"{prefix}.mlp.2.bias": (d,)}
    shapes |= {f"{prefix}.mlp_ln.weight": (d,), f"{prefix}.mlp_ln.bias": (d,)}
    return shapes


def check_complete(state_dict: StateDict, dims: ModelDims, source: str) -> None:
    """Raise ModelLoadError naming missing, unexpected, mis-shaped and non-float keys (a few of each, then counts).

    Every tensor must be a dense float one: an integer or bool tensor (an int8 state dict without scales) failed
    the model's build with a traceback, and a sparse one loaded and then failed every request (a 500 each)."""
    expected = expected_shapes(dims)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    tensors = {k: v for k, v in state_dict.items() if k in expected and isinstance(v, torch.Tensor)}
    wrong = [
        f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in tensors.items() if tuple(v.shape) != expected[k]
    ]
    not_float = [
        f"{k} ({'sparse ' if v.layout != torch.strided else ''}{str(v.dtype).removeprefix('torch.')})"
        for k, v in tensors.items()
        if v.layout != torch.strided or not v.is_floating_point()
    ]
    not_float += [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if k in expected and k not in tensors]
    problems = [
        f"{label}: {_few(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
            ("not a dense float tensor", not_float),
        )
        if items
    ]
    if problems:
        raise ModelLoadError(f"{source} is not a complete Whisper checkpoint: " + "; ".join(problems))


def _few(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def catalog_name(dims: ModelDims, hint: str) -> str | None:
    """The catalog name for these dims: the hint if it names a model of these dims, else the only match."""
    if KNOWN_DIMS.get(canonical_name(hint)) == dims:
        return canonical_name(hint)
    matches = [n for n, d in KNOWN_DIMS.items() if d == dims and canonical_name(n) == n]
    return matches[0] if len(matches) == 1 else None


def check_dims(dims: ModelDims, source: str) -> None:
    """Refuse dims no Whisper can run with, which the tensors' shapes alone do not show: heads that do not
    divide the width (a checkpoint with 5 heads of 384 loaded, then every request failed with a 500), a
    vocabulary without Whisper's special tokens, a mel count the front end does not make."""
    problems = [f"{name} is {value}" for name, value in dims.as_dict().items() if value <= 0]
    # Layer counts are bounded before anything is built from them: a 1 KB config.json saying 10**8 layers had
    # check_complete list every expected key, gigabytes of them, until the process ran out of memory.
    problems += [
        f"{name} is {getattr(dims, name)}, more than {MAX_LAYERS}"
        for name in ("n_audio_layer", "n_text_layer")
        if getattr(dims, name) > MAX_LAYERS
    ]
    if dims.n_audio_state != dims.n_text_state:  # the decoder's cross-attention reads the encoder's output as is
        problems.append(f"n_audio_state {dims.n_audio_state} is not n_text_state {dims.n_text_state}")
    if dims.n_text_ctx < MIN_TEXT_CTX:  # a shorter table cut every transcript short, without an error
        problems.append(f"n_text_ctx is {dims.n_text_ctx}, fewer than Whisper's {MIN_TEXT_CTX} text positions")
    for state, heads in (("n_audio_state", "n_audio_head"), ("n_text_state", "n_text_head")):
        width, count = getattr(dims, state), getattr(dims, heads)
        if count > 0 and width % count:
            problems.append(f"{state} {width} is not a multiple of {heads} {count}")
    if dims.n_vocab not in VOCAB_SIZES:
        problems.append(f"n_vocab is {dims.n_vocab}, not one of Whisper's vocabularies {VOCAB_SIZES}")
    if dims.n_mels not in (80, 128):
        problems.append(f"n_mels is {dims.n_mels}, not 80 or 128")
    if dims.n_audio_ctx != N_FRAMES // 2:
        problems.append(f"n_audio_ctx is {dims.n_audio_ctx}, not {N_FRAMES // 2} (30 s windows)")
    if problems:
        raise ModelLoadError(f"{source} has dimensions Whisper cannot run with: " + "; ".join(problems))


def _finish(dims: ModelDims, state_dict: StateDict, heads: Heads | None, hint: str, source: str) -> LoadedWeights:
    """Validate a converted checkpoint and fill in its name and alignment heads."""
    check_dims(dims, source)
    check_complete(state_dict, dims, source)
    name = catalog_name(dims, hint) or hint
    if not heads:  # none given, or an empty list: word timing needs some
        heads = alignment_heads_for(name, dims)
    bad = [h for h in heads if not (0 <= h[0] < dims.n_text_layer and 0 <= h[1] < dims.n_text_head)]
    if bad:
        raise ModelLoadError(f"{source}: alignment heads {bad} are outside the decoder's layers and heads")
    return LoadedWeights(dims, state_dict, tuple(heads), name, source)


# What a file of the right format but the wrong content raises in the parsers and converters below (a JSON list
# where an object belongs, a tensor of the wrong rank, a negative offset, a cut gzip stream ...): each is a
# ModelLoadError, never a traceback. (A failed read, an OSError, is reported as one; /dev/null is refused first.)
_CORRUPT = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    RuntimeError,
    EOFError,
    OverflowError,
    zlib.error,
)


def load_weights(path: Path) -> LoadedWeights:
    """Load a CTranslate2 directory, an OpenAI `.pt` file or a Hugging Face directory (by what it holds)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ModelNotFound(f"no model at {path} (no such file or directory)")
    if not (path.is_file() or path.is_dir()):
        raise ModelLoadError(f"{path} is neither a file nor a directory")
    try:
        return _load(path)
    except HalkSpeechError:
        raise
    except OSError as exc:  # a read that failed (permissions, I/O): nothing says the files are corrupt
        raise ModelLoadError(f"{path} could not be read ({_reason(exc)})") from exc
    except _CORRUPT as exc:
        raise ModelLoadError(f"{path} is corrupt or not a Whisper model ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' if reason else ''}{reason}"


def _load(path: Path) -> LoadedWeights:
    if path.is_file():
        if path.name == "model.bin" or path.suffix == ".safetensors" or path.name.startswith("pytorch_model"):
            # a file of a directory's model stands for the directory, whose loader reads only its own file names:
            # `dir/finetuned.safetensors` silently loaded dir/model.safetensors
            read = _directory_files(path.parent)
            if not read:  # e.g. model.safetensors copied without its config.json
                raise ModelLoadError(
                    f"{path} is not loaded by itself, and {path.parent} holds no model that reads it: a Hugging "
                    "Face weights file needs config.json beside it, a CTranslate2 model.bin config.json too"
                )
            if path.name not in read:
                raise ModelLoadError(
                    f"{path} is not a file its directory loads (it loads {', '.join(sorted(read)[:4])}): give the "
                    "directory to load those, or one where this file is the only weights file, under that name"
                )
            return load_weights(path.parent)
        dims, sd, heads = openai_pt.load_openai_pt(path)
        return _finish(dims, sd, heads, path.stem, f"OpenAI checkpoint {path}")
    if (path / "model.bin").is_file():
        dims, sd, heads = ct2.load_ct2(path)
        return _finish(dims, sd, heads, path.name, f"CTranslate2 directory {path}")
    if hf.is_hf_dir(path):
        dims, sd, heads = hf.load_hf(path)
        return _finish(dims, sd, heads, path.name, f"Hugging Face directory {path}")
    checkpoints = sorted(path.glob("*.pt"))
    if len(checkpoints) == 1:
        return load_weights(checkpoints[0])
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise ModelLoadError(
        f"{path} holds no Whisper model: expected model.bin + config.json (CTranslate2), config.json + "
        f"model.safetensors or pytorch_model.bin (Hugging Face), or one .pt file; found {found}"
    )


def _directory_files(directory: Path) -> set[str]:
    """The weights files `load_weights(directory)` reads (CTranslate2 first, then safetensors, then .bin)."""
    if (directory / "model.bin").is_file():
        return {"model.bin"}
    if not hf.is_hf_dir(directory):
        return set()
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return {single}
        index = directory / f"{single}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            return {single + ".index.json", *(v for v in weight_map.values() if isinstance(v, str))}
    return set()


def random_weights(
    name: str, *, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", seed: int = 0
) -> LoadedWeights:
    """Weights of the exact shapes of a catalog model, made on `device` (benchmarks only: they mean nothing).

    Matrices ~ normal(0, 0.02), biases 0, layer-norm gains 1, encoder positions the usual sinusoids;
    the same seed on the same device gives the same weights.
    """
    canonical = canonical_name(name)
    if canonical not in KNOWN_DIMS:
        raise ModelNotFound(f"no model named {name!r} to make random weights for; known: {', '.join(KNOWN_DIMS)}")
    dims = KNOWN_DIMS[canonical]
    device = torch.device(device)
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    state_dict: StateDict = {}
    for key, shape in expected_shapes(dims).items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if key == "encoder.positional_embedding":
            tensor.copy_(sinusoids(*shape, device=device))
        elif key.endswith(".bias"):
            tensor.zero_()
        elif len(shape) == 1:  # layer-norm gains
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=gen)
        state_dict[key] = tensor
    heads = alignment_heads_for(canonical, dims)
    return LoadedWeights(dims, state_dict, heads, canonical, f"random weights of {canonical} (benchmarking only)")


def sinusoids(length: int, channels: int, *, device: torch.device | None = None) -> torch.Tensor:
    """OpenAI's encoder position table: [length, channels] float32, sin half then cos half."""
    increment = math.log(10_000) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, device=device, dtype=torch.float32))
    scaled = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
