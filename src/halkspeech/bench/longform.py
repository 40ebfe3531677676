"""Long-form benchmark: one long file (default an hour) through batched mode, end to end, with the time of each
stage; the cost of word timestamps on many concurrent files; and, with --url, the same file through a server.

The file is real speech: the dev recordings (../shared/data/dev, English clips with references; the committed
tests/data clips where that is absent) repeated in a seeded order with 0.3-1.2 s pauses, written as a 16 kHz
WAV, so VAD and chunking see real pauses. With random
weights (`random:large-v3-turbo`) `--force-tokens-per-second` makes every chunk decode a realistic number of
tokens (speech seconds × rate); with real weights the transcript is scored (WER) when jiwer is installed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from halkspeech.audio import decode_audio
from halkspeech.bench.common import (
    check_output,
    check_ranges,
    device_info,
    median,
    print_table,
    synchronize,
    write_json,
)
from halkspeech.config import MAX_ENCODER_BATCH, MAX_SLOTS, EngineSettings, ModelSettings
from halkspeech.engine.factory import ModelEngine, start_engine
from halkspeech.errors import InvalidRequest
from halkspeech.model.dims import SAMPLE_RATE
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.types import TranscribeOptions, Transcript

_REPO = Path(__file__).resolve().parents[3]
# the dev set beside the checkout (../shared), or inside it (shared/) where a copy of the tree carries it
DEV_DIR = next(
    (d for d in (_REPO.parent / "shared/data/dev", _REPO / "shared/data/dev") if d.exists()),
    _REPO.parent / "shared/data/dev",
)


@dataclass(frozen=True)
class LongformConfig:
    model: str = "random:large-v3-turbo"
    minutes: float = 60.0
    force_tokens_per_second: float | None = 4.0  # None: decode freely (real weights)
    words: bool = True  # word timestamps in the long-file and server runs
    compare_files: int = 8  # concurrent files for the words/no-words comparison (0: skip it)
    compare_minutes: float = 10.0
    repeats: int = 3
    url: str | None = None
    device: Literal["cuda", "cpu"] = "cuda"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    max_slots: int = 0  # 0: from free GPU memory
    encoder_batch: int = 64
    dev_dir: str | None = None  # None: ../shared/data/dev, or the committed test clips where it is missing
    seed: int = 0
    gil_switch_ms: float = EngineSettings().gil_switch_ms
    json_path: str | None = None

    def __post_init__(self) -> None:
        check_output(self.json_path)
        check_ranges(
            minutes=(self.minutes, 0.1, 24 * 60),
            force_tokens_per_second=(self.force_tokens_per_second, 0.1, 50),
            compare_files=(self.compare_files, 0, 256),
            compare_minutes=(self.compare_minutes, 0.1, 24 * 60),
            repeats=(self.repeats, 1, 1000),
            max_slots=(self.max_slots, 0, MAX_SLOTS),
            encoder_batch=(self.encoder_batch, 1, MAX_ENCODER_BATCH),
            gil_switch_ms=(self.gil_switch_ms, 0, 100),
        )
        if self.dev_dir is not None and not (Path(self.dev_dir) / "manifest.jsonl").is_file():
            raise InvalidRequest(f"--dev-dir {self.dev_dir}: no manifest.jsonl there")


# --- the audio ---------------------------------------------------------------------------------------------
# the committed test recordings: the fallback where the dev set is not beside the tree (a bare GPU machine)
_TEST_CLIPS = {
    "jfk.flac": "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country.",
    "LJ001-0002.wav": "in being comparatively modern.",
    "1089-134691-0000.flac": "HE COULD WAIT NO LONGER",
}


def clip_source(dev_dir: str | None) -> Path | None:
    """The dev set to build the audio from (None: the committed test clips, where there is none)."""
    chosen = Path(dev_dir) if dev_dir is not None else DEV_DIR
    return chosen if (chosen / "manifest.jsonl").is_file() else None


def _clips(dev_dir: Path | None) -> list[tuple[Path, str]]:
    """(audio path, reference) of every English dev clip with a reference, or of the committed test clips."""
    if dev_dir is None:
        return [(_REPO / "tests" / "data" / name, text) for name, text in _TEST_CLIPS.items()]
    manifest = dev_dir / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [(dev_dir / r["audio"], r["text"]) for r in rows if r.get("language") == "en" and r.get("text")]


@functools.cache
def _decoded(dev_dir: Path | None) -> tuple[np.ndarray, ...]:
    return tuple(decode_audio(path) for path, _ in _clips(dev_dir))


def build_audio(dev_dir: Path | None, minutes: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """English clips with references, in a seeded random order with 0.3-1.2 s pauses, repeated until at
    least `minutes` long: (samples [n] float32, the references in order)."""
    sources, clips = _clips(dev_dir), _decoded(dev_dir)
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    total, target = 0, int(minutes * 60 * SAMPLE_RATE)
    while total < target:
        for i in rng.permutation(len(clips)):
            pause = np.zeros(int(rng.uniform(0.3, 1.2) * SAMPLE_RATE), dtype=np.float32)
            pieces += [clips[i], pause]
            texts.append(sources[i][1])
            total += len(clips[i]) + len(pause)
            if total >= target:
                break
    return np.concatenate(pieces), texts  # whole clips only (a little over `minutes`), so WER is fair


def write_wav(path: Path, audio: np.ndarray) -> Path:
    pcm = (np.clip(audio, -1, 1 - 1 / 32768) * 32768).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return path


# --- measuring -----------------------------------------------------------------------------------------------
def _options(cfg: LongformConfig, words: bool) -> TranscribeOptions:
    return TranscribeOptions(
        language="en",
        mode="batched",
        word_timestamps=words,
        force_tokens_per_second=cfg.force_tokens_per_second,
    )


def _engine_counts(model: ModelEngine) -> tuple[int, int]:
    stats = model.engine.stats
    return stats.admitted, stats.tokens


def run_file(model: ModelEngine, wav: Path, options: TranscribeOptions) -> tuple[dict[str, Any], Transcript]:
    """Decode the WAV and transcribe it: wall time end to end and per stage (seconds)."""
    windows, tokens = _engine_counts(model)
    synchronize(model.device)
    started = time.perf_counter()
    audio = decode_audio(wav)
    decoded = time.perf_counter()
    transcript = asyncio.run(Transcriber(model).transcribe(audio, options))
    synchronize(model.device)
    wall = time.perf_counter() - started
    t = transcript.timings
    windows, tokens = (a - b for a, b in zip(_engine_counts(model), (windows, tokens), strict=True))
    row = {
        "audio_min": transcript.duration / 60,
        "wall_s": wall,
        "rtfx": transcript.duration / wall,
        "decode_s": decoded - started,
        "vad_s": t.vad / 1000,
        "mel_s": t.features / 1000,
        "engine_s": t.engine / 1000,
        "encoder_sum_s": t.encoder / 1000,  # summed over windows: they overlap
        "decoder_sum_s": t.decoder / 1000,
        "words_s": t.words / 1000,
        "stitch_s": t.stitch / 1000,
        "windows": windows,
        "windows_per_s": windows / wall,
        "tokens_per_s": tokens / wall,
        "segments": len(transcript.segments),
        "words": len(transcript.words),
    }
    return row, transcript


def run_concurrent(model: ModelEngine, audios: list[np.ndarray], options: TranscribeOptions) -> dict[str, Any]:
    """Many files at once through one engine (audio already decoded): throughput in audio seconds per second."""

    async def all_files() -> list[Transcript]:
        transcriber = Transcriber(model)
        return list(await asyncio.gather(*(transcriber.transcribe(a, options) for a in audios)))

    synchronize(model.device)
    stats = model.engine.stats
    before, retries, calls = stats.phases(), _alloc_retries(model.device), stats.align_calls
    started = time.perf_counter()
    transcripts = asyncio.run(all_files())
    synchronize(model.device)
    wall = time.perf_counter() - started
    seconds = sum(t.duration for t in transcripts)
    # the engine thread's time in each phase during this run (align: word timing's decoder passes), and how
    # often the CUDA caching allocator had to free its cache to allocate (each a device sync)
    phases = {key: round(value - before[key], 3) for key, value in stats.phases().items()}
    phases["alloc_retries"] = _alloc_retries(model.device) - retries
    phases["align_calls"] = stats.align_calls - calls
    return {"wall_s": wall, "rtfx": seconds / wall, "words": sum(len(t.words) for t in transcripts), **phases}


def _alloc_retries(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0)) if device.type == "cuda" else 0


def check_server(url: str) -> None:
    """Before any of the benchmark's own work: the server answers /health (else one line, not a traceback at
    the end of the run)."""
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=10)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: httpx's InvalidURL and bad ports
        raise InvalidRequest(f"--url {url}: {str(exc) or type(exc).__name__}") from None
    if response.status_code != 200:
        raise InvalidRequest(f"--url {url}: /health answered {response.status_code}")


def run_server(url: str, wav: Path, model_name: str, words: bool, duration: float) -> dict[str, Any]:
    """POST the WAV to the server's simple API (batched mode) and time the answer."""
    import httpx

    params = {"mode": "batched", "word_timestamps": str(words).lower(), "timings": "true", "model": model_name}
    started = time.perf_counter()
    try:
        with wav.open("rb") as file:
            response = httpx.post(
                f"{url.rstrip('/')}/transcribe",
                params=params,
                files={"file": (wav.name, file, "audio/wav")},
                timeout=3600,
            )
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"the server at {url} failed: {str(exc) or type(exc).__name__}") from None
    wall = time.perf_counter() - started
    if response.status_code != 200:
        raise InvalidRequest(f"server answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    return {
        "wall_s": wall,
        "rtfx": duration / wall,
        "server_processing_s": body.get("processing_time"),
        "server_timings_ms": body.get("timings_ms"),
        "segments": len(body.get("segments", [])),
    }


def _wer(references: list[str], transcript: Transcript) -> float | None:
    try:
        import jiwer
        from whisper.normalizers import EnglishTextNormalizer
    except ImportError:
        return None
    normalise = EnglishTextNormalizer()
    return float(jiwer.wer(normalise(" ".join(references)), normalise(transcript.text)))


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (its stages belong together)."""
    ordered = sorted(rows, key=lambda r: r["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


# --- the benchmark -------------------------------------------------------------------------------------------
def run_longform_bench(cfg: LongformConfig) -> dict[str, Any]:
    if cfg.url:
        check_server(cfg.url)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    weights = ModelRegistry(ModelSettings()).load(cfg.model, dtype=dtype, device=cfg.device)
    settings = EngineSettings(
        device=cfg.device,
        dtype=cfg.dtype,
        max_slots=cfg.max_slots,
        reserved_live_slots=0,  # no live turns in this run: every slot takes the file's windows
        max_encoder_batch=cfg.encoder_batch,
        gil_switch_ms=cfg.gil_switch_ms,
    )
    model = start_engine(weights, settings)
    payload: dict[str, Any] = {"config": asdict(cfg), "device": device_info(model.device)}
    gpu = payload["device"].get("gpu", payload["device"]["device"])
    dev_dir = clip_source(cfg.dev_dir)
    payload["clips"] = str(dev_dir) if dev_dir else "the committed test clips (tests/data): no dev set found"
    try:
        with tempfile.TemporaryDirectory(prefix="halkspeech-longform-") as tmp:
            audio, references = build_audio(dev_dir, cfg.minutes, cfg.seed)
            wav = write_wav(Path(tmp) / f"longform_{cfg.minutes:g}min.wav", audio)
            warm = write_wav(Path(tmp) / "warmup.wav", audio[: 3 * 60 * SAMPLE_RATE])
            run_file(model, warm, _options(cfg, not cfg.words))  # CUDA graphs, cuDNN, allocator, both paths
            run_file(model, wav, _options(cfg, cfg.words))  # every batch-size bucket the long file reaches
            rows = [run_file(model, wav, _options(cfg, cfg.words)) for _ in range(max(1, cfg.repeats))]
            row, transcript = _median_row([r for r, _ in rows]), rows[0][1]
            row["wer"] = None if cfg.model.startswith("random:") else _wer(references, transcript)
            payload["file"] = row
            title = f"Long-form batched, {cfg.model}, {row['audio_min']:.1f} min, words={cfg.words}, on {gpu}"
            payload["file_table"] = print_table([row], _FILE_COLUMNS, title=title)
            if cfg.compare_files:
                payload["words"] = _compare_words(model, cfg, dev_dir)
                payload["words_table"] = print_table(
                    payload["words"]["rows"], _WORDS_COLUMNS, title=_words_title(cfg, payload["words"]["loss"])
                )
            if cfg.url:
                try:
                    server = run_server(cfg.url, wav, cfg.model, cfg.words, len(audio) / SAMPLE_RATE)
                except InvalidRequest as exc:
                    payload["server_error"] = str(exc)
                    write_json(cfg.json_path, payload)  # the runs before it are kept
                    raise
                payload["server"] = server
                payload["server_table"] = print_table([server], _SERVER_COLUMNS, title=f"Through {cfg.url}")
    finally:
        model.close()
    write_json(cfg.json_path, payload)
    return payload


def _compare_words(model: ModelEngine, cfg: LongformConfig, dev_dir: Path | None) -> dict[str, Any]:
    """`compare_files` files of `compare_minutes` at once, without and with word timestamps, alternating; the
    loss is 1 - (throughput with words / without), medians. Each file is the clips in an order of its own
    (stretches of the long file were one and the same audio whenever it was no longer than a file)."""
    files = [build_audio(dev_dir, cfg.compare_minutes, cfg.seed + 1 + i)[0] for i in range(cfg.compare_files)]
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(max(1, cfg.repeats)):
        for words in (False, True):
            results[words].append(run_concurrent(model, files, _options(cfg, words)))
    rows = []
    for words, runs in results.items():
        rtfx = median([r["rtfx"] for r in runs])
        minutes_each = sum(len(f) for f in files) / len(files) / SAMPLE_RATE / 60
        row = {"words": words, "files": len(files), "minutes_each": minutes_each, "rtfx": rtfx}
        keys = ("wall_s", "busy_s", "step_s", "admit_s", "align_s", "align_calls", "alloc_retries")
        row |= {key: median([r[key] for r in runs]) for key in keys}
        rows.append(row)
    loss = 1 - rows[1]["rtfx"] / rows[0]["rtfx"]
    rows[1]["loss_pct"] = 100 * loss
    return {"rows": rows, "loss": loss, "runs": {str(k): v for k, v in results.items()}}


def _words_title(cfg: LongformConfig, loss: float) -> str:
    return f"Word timestamps on {cfg.compare_files} concurrent files: throughput loss {100 * loss:.1f}% (target ≤ 15%)"


_FILE_COLUMNS = [
    ("audio_min", "audio min"),
    ("wall_s", "wall s"),
    ("rtfx", "RTFx"),
    ("decode_s", "decode s"),
    ("vad_s", "VAD s"),
    ("mel_s", "mel s"),
    ("engine_s", "engine s"),
    ("encoder_sum_s", "Σ encoder s"),
    ("decoder_sum_s", "Σ decoder s"),
    ("words_s", "Σ words s"),
    ("stitch_s", "stitch s"),
    ("windows", "windows"),
    ("windows_per_s", "windows/s"),
    ("tokens_per_s", "tokens/s"),
    ("wer", "WER"),
]
_WORDS_COLUMNS = [
    ("words", "words"),
    ("files", "files"),
    ("minutes_each", "min each"),
    ("rtfx", "RTFx"),
    ("wall_s", "wall s"),
    ("busy_s", "engine busy s"),
    ("step_s", "steps s"),
    ("admit_s", "admit s"),
    ("align_s", "align s"),
    ("align_calls", "align calls"),
    ("alloc_retries", "alloc retries"),
    ("loss_pct", "loss %"),
]
_SERVER_COLUMNS = [
    ("wall_s", "wall s"),
    ("rtfx", "RTFx"),
    ("server_processing_s", "server s"),
    ("segments", "segments"),
]
