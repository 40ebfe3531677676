"""Model shapes: the dimensions of every released Whisper and the alignment heads used for word timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Audio front end, fixed by the model family.
SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds of audio per window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480_000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100: 10 ms per mel frame
INPUT_STRIDE = 2  # the second convolution has stride 2: 2 mel frames per encoder position
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token


@dataclass(frozen=True)
class ModelDims:
    """The ten numbers that define a Whisper network (named as in OpenAI's checkpoints)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @property
    def is_multilingual(self) -> bool:
        """English-only checkpoints have 51864 tokens; multilingual ones 51865 or more."""
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        """99 languages for v1/v2 vocabularies, 100 (with Cantonese) for large-v3's."""
        return self.n_vocab - 51765 - int(self.is_multilingual)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _dims(state: int, heads: int, enc_layers: int, dec_layers: int, *, vocab: int, mels: int = 80) -> ModelDims:
    return ModelDims(
        n_mels=mels,
        n_audio_ctx=1500,
        n_audio_state=state,
        n_audio_head=heads,
        n_audio_layer=enc_layers,
        n_vocab=vocab,
        n_text_ctx=448,
        n_text_state=state,
        n_text_head=heads,
        n_text_layer=dec_layers,
    )


_EN, _ML, _V3 = 51864, 51865, 51866
#: Every Whisper vocabulary: English-only (GPT-2 + Whisper's tokens), 99 languages, large-v3's 100.
VOCAB_SIZES = (_EN, _ML, _V3)

#: Shapes of every released checkpoint, by the names users type.
KNOWN_DIMS: dict[str, ModelDims] = {
    "tiny.en": _dims(384, 6, 4, 4, vocab=_EN),
    "tiny": _dims(384, 6, 4, 4, vocab=_ML),
    "base.en": _dims(512, 8, 6, 6, vocab=_EN),
    "base": _dims(512, 8, 6, 6, vocab=_ML),
    "small.en": _dims(768, 12, 12, 12, vocab=_EN),
    "small": _dims(768, 12, 12, 12, vocab=_ML),
    "medium.en": _dims(1024, 16, 24, 24, vocab=_EN),
    "medium": _dims(1024, 16, 24, 24, vocab=_ML),
    "large-v1": _dims(1280, 20, 32, 32, vocab=_ML),
    "large-v2": _dims(1280, 20, 32, 32, vocab=_ML),
    "large-v3": _dims(1280, 20, 32, 32, vocab=_V3, mels=128),
    "large-v3-turbo": _dims(1280, 20, 32, 4, vocab=_V3, mels=128),
    "distil-small.en": _dims(768, 12, 12, 4, vocab=_EN),
    "distil-medium.en": _dims(1024, 16, 24, 2, vocab=_EN),
    "distil-large-v2": _dims(1280, 20, 32, 2, vocab=_ML),
    "distil-large-v3": _dims(1280, 20, 32, 2, vocab=_V3, mels=128),
    "distil-large-v3.5": _dims(1280, 20, 32, 2, vocab=_V3, mels=128),
}
KNOWN_DIMS["large"] = KNOWN_DIMS["large-v3"]
KNOWN_DIMS["turbo"] = KNOWN_DIMS["large-v3-turbo"]

#: Cross-attention heads (decoder layer, head) that track the audio position; from OpenAI's release.
ALIGNMENT_HEADS: dict[str, tuple[tuple[int, int], ...]] = {
    "tiny.en": ((1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)),
    "tiny": ((2, 2), (3, 0), (3, 2), (3, 3), (3, 4), (3, 5)),
    "base.en": ((3, 3), (4, 7), (5, 1), (5, 5), (5, 7)),
    "base": ((3, 1), (4, 2), (4, 3), (4, 7), (5, 1), (5, 2), (5, 4), (5, 6)),
    "small.en": (
        (6, 6), (7, 0), (7, 3), (7, 8), (8, 2), (8, 5), (8, 7), (9, 0), (9, 4), (9, 8),
        (9, 10), (10, 0), (10, 1), (10, 2), (10, 3), (10, 6), (10, 11), (11, 2), (11, 4),
    ),
    "small": ((5, 3), (5, 9), (8, 0), (8, 4), (8, 7), (8, 8), (9, 0), (9, 7), (9, 9), (10, 5)),
    "medium.en": (
        (11, 4), (14, 1), (14, 12), (14, 14), (15, 4), (16, 0), (16, 4), (16, 9), (17, 12),
        (17, 14), (18, 7), (18, 10), (18, 15), (20, 0), (20, 3), (20, 9), (20, 14), (21, 12),
    ),
    "medium": ((13, 15), (15, 4), (15, 15), (16, 1), (20, 0), (23, 4)),
    "large-v1": ((9, 19), (11, 2), (11, 4), (11, 17), (22, 7), (22, 11), (22, 17), (23, 2), (23, 15)),
    "large-v2": (
        (10, 12), (13, 17), (16, 11), (16, 12), (16, 13), (17, 15), (17, 16), (18, 4), (18, 11),
        (18, 19), (19, 11), (21, 2), (21, 3), (22, 3), (22, 9), (22, 12), (23, 5), (23, 7),
        (23, 13), (25, 5), (26, 1), (26, 12), (27, 15),
    ),
    "large-v3": ((7, 0), (10, 17), (12, 18), (13, 12), (16, 1), (17, 14), (19, 11), (21, 4), (24, 1), (25, 6)),
    "large-v3-turbo": ((2, 4), (2, 11), (3, 3), (3, 6), (3, 11), (3, 14)),
}  # fmt: skip


def default_alignment_heads(dims: ModelDims) -> tuple[tuple[int, int], ...]:
    """Every head of the second half of the decoder: OpenAI's fallback when a checkpoint names none."""
    first = dims.n_text_layer // 2
    return tuple((layer, head) for layer in range(first, dims.n_text_layer) for head in range(dims.n_text_head))


def alignment_heads_for(name: str, dims: ModelDims) -> tuple[tuple[int, int], ...]:
    """The catalog's alignment heads for `name`, else OpenAI's fallback: far more heads (320 for large-v3's
    shape against its 10), whose word timing runs eagerly (engine/factory.py: alignment_graph_rows)."""
    return ALIGNMENT_HEADS.get(name) or default_alignment_heads(dims)


def canonical_name(name: str) -> str:
    """Map user spellings (`whisper-large-v3`, `openai/whisper-tiny.en`, `turbo`) to catalog names."""
    short = name.strip().split("/")[-1].lower()
    for prefix in ("faster-whisper-", "whisper-"):
        if short.startswith(prefix):
            short = short[len(prefix) :]
    aliases = {"large": "large-v3", "turbo": "large-v3-turbo", "large-v3turbo": "large-v3-turbo"}
    return aliases.get(short, short)
