"""`halkspeech transcribe AUDIO...`: transcribe files on this machine with one engine shared by all of them.

Every file is decoded in a thread and transcribed concurrently through the same engine, so windows of
different files share encoder and decoder batches. Results are printed in input order, each as soon as it and
every file before it are done; a file that fails gets one error line and the others still complete (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
from tqdm import tqdm

from halkspeech.audio import decode_audio
from halkspeech.cli.argtypes import finite_float
from halkspeech.cli.transcribe_output import Output
from halkspeech.config import DType, load_settings
from halkspeech.engine.factory import ModelEngine, Replicas, start_engines
from halkspeech.errors import HalkSpeechError, InvalidRequest
from halkspeech.model.dims import SAMPLE_RATE, ModelDims
from halkspeech.model.languages import normalize_language
from halkspeech.model.registry import ModelRegistry
from halkspeech.transcription.formats import FORMATS
from halkspeech.transcription.pipeline import Transcriber
from halkspeech.transcription.sequential import Progress
from halkspeech.transcription.subtitles import READABLE, SubtitleOptions
from halkspeech.transcription.types import DEFAULT_TEMPERATURES, TranscribeOptions, Transcript
from halkspeech.transcription.window import WindowDecoder

log = logging.getLogger(__name__)

STDIN = "-"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "transcribe",
        help="transcribe or translate audio files with a local model",
        description=(
            "Transcribe audio or video files (anything FFmpeg reads; '-' reads stdin). All files share one "
            "engine and run concurrently; results are printed in input order. A file that fails prints "
            "'halkspeech: error: FILE: reason' on stderr and the exit status is 1; the others still complete."
        ),
        epilog="example: halkspeech transcribe --model base --output-format srt talk.mp3 > talk.srt",
    )
    parser.add_argument("audio", nargs="+", metavar="AUDIO", help="audio or video files, or '-' for stdin")
    model = parser.add_argument_group("model and device")
    model.add_argument(
        "--model",
        default=None,
        help="catalog name (tiny.en, base ...), owner/repo or a local path (default: the model.default setting, "
        "base unless HALKSPEECH_MODEL__DEFAULT or WHISPER__MODEL says otherwise)",
    )
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: cuda if present")
    model.add_argument(
        "--device-index",
        metavar="I[,I...]",
        help="GPU index, or several (0,1): one engine on each, every file on the least loaded (default: 0)",
    )
    model.add_argument(
        "--dtype",
        choices=get_args(DType),
        default=None,
        help="default (auto): float16 on cuda, float32 on cpu; int8: int8 weights on cpu, faster",
    )
    model.add_argument("--offline", action="store_true", help="use only cached models, never download")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--language", default=None, help="spoken language, e.g. en, tr (default: detect)")
    decoding.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    decoding.add_argument(
        "--temperature",
        type=_temperatures,
        default=DEFAULT_TEMPERATURES,
        metavar="T[,T...]",
        help="one temperature, or the fallback schedule tried in order (default: 0,0.2,0.4,0.6,0.8,1)",
    )
    decoding.add_argument("--beam-size", type=int, default=1, help="beams at temperature 0 (default: 1, greedy)")
    decoding.add_argument("--best-of", type=int, default=1, help="samples per window at temperature > 0")
    decoding.add_argument("--patience", type=finite_float, default=1.0, help="beam search patience (default: 1)")
    decoding.add_argument(
        "--initial-prompt", default=None, help="text that conditions the first window (batched: every chunk)"
    )
    decoding.add_argument(
        "--hotwords",
        metavar="TEXT",
        help="words or phrases to favour, such as names and terms: they lead every window's prompt",
    )
    decoding.add_argument(
        "--no-condition-on-previous-text",
        dest="condition_on_previous_text",
        action="store_false",
        help="do not feed each window the text before it (fewer repetition loops, less context; batched mode "
        "never does)",
    )
    decoding.add_argument("--word-timestamps", action="store_true", help="word timings (verbose_json 'words')")
    decoding.add_argument(
        "--mode",
        choices=("sequential", "batched"),
        default="sequential",
        help="sequential: 30 s windows in order, each conditioned on the last; batched: the speech the VAD "
        "finds, in chunks of up to 30 s decoded at once, each without the text before it (audio the VAD hears "
        "no speech in, such as music, is not transcribed)",
    )
    decoding.add_argument(
        "--vad-filter",
        action="store_true",
        help="transcribe only the speech silero-vad hears (faster-whisper's vad_filter: pauses of 2 s or more are "
        "cut), times still the file's; sequential mode (batched mode decodes only the VAD's speech anyway)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output-format", "-f", choices=FORMATS, default="text")
    output.add_argument("--output-dir", "-o", type=Path, default=None, help="write NAME.txt/.json/.srt/.vtt here")
    output.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    cues = parser.add_argument_group(
        "subtitles (srt, vtt)",
        f"Cues are laid out for reading by default: lines of {READABLE.max_line_width} columns (a CJK character "
        f"takes two), {READABLE.max_line_count} lines, {READABLE.max_cue_duration:g} s on screen, cut at words "
        "(their times with --word-timestamps, else shares of the segment's time; text without spaces is cut "
        "where a line is full).",
    )
    cues.add_argument("--max-line-width", type=int, default=READABLE.max_line_width, metavar="COLUMNS")
    cues.add_argument("--max-line-count", type=int, default=READABLE.max_line_count, metavar="LINES")
    cues.add_argument("--max-cue-duration", type=finite_float, default=READABLE.max_cue_duration, metavar="S")
    cues.add_argument("--segment-cues", action="store_true", help="one cue per segment, as the OpenAI API writes them")
    cues.add_argument(
        "--highlight-words", action="store_true", help="a cue per word, that word underlined (needs --word-timestamps)"
    )
    output.add_argument(
        "--jobs", type=int, default=32, help="files transcribed at once, each held decoded in memory (default: 32)"
    )
    parser.set_defaults(func=run)


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list: {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one temperature")
    return values


def run(args: argparse.Namespace) -> int:
    if args.audio.count(STDIN) > 1:
        raise InvalidRequest("stdin ('-') can be read only once")
    if args.jobs < 1:
        raise InvalidRequest("--jobs must be at least 1")
    options = _options(args)  # option errors before any model is loaded
    settings = load_settings(
        engine__device=args.device,
        engine__device_index=args.device_index,
        engine__dtype=args.dtype,
        engine__reserved_live_slots=0,  # no live turns on the command line: every slot takes the files
        model__allow_download=False if args.offline else None,
    )
    output = Output(
        args.output_format, args.output_dir, task=args.task, words=args.word_timestamps, subtitles=_subtitles(args)
    )
    names = output.prepare(args.audio)
    weights = ModelRegistry(settings.model).load(args.model or settings.model.default)
    _check_language(options, weights.dims, weights.name)
    if not weights.dims.is_multilingual:
        output.task = "transcribe"  # what an English-only model did (verbose_json's "task")
    engines = start_engines(weights, settings.engine)
    try:
        for model in engines.models:  # each may have planned other slots (the memory its GPU had free)
            _check_group_size(model, options)
        jobs = min(args.jobs, settings.engine.max_queue)
        return asyncio.run(_transcribe_all(engines, args.audio, names, options, output, jobs, _show_progress(args)))
    finally:
        engines.close()


def _options(args: argparse.Namespace) -> TranscribeOptions:
    return TranscribeOptions(
        language=normalize_language(args.language),
        task=args.task,
        temperatures=args.temperature,
        beam_size=args.beam_size,
        best_of=args.best_of,
        patience=args.patience,
        initial_prompt=args.initial_prompt,
        hotwords=args.hotwords,
        condition_on_previous_text=args.condition_on_previous_text,
        word_timestamps=args.word_timestamps,
        mode=args.mode,
        vad_filter=args.vad_filter,
    )


def _subtitles(args: argparse.Namespace) -> SubtitleOptions:
    if args.highlight_words and not args.word_timestamps:
        raise InvalidRequest("--highlight-words needs --word-timestamps")
    if args.segment_cues:
        return SubtitleOptions(highlight_words=args.highlight_words)
    return SubtitleOptions(args.max_line_width, args.max_line_count, args.max_cue_duration, args.highlight_words)


def _check_language(options: TranscribeOptions, dims: ModelDims, name: str) -> None:
    """The language must be in the model's vocabulary; English-only models transcribe English whatever is
    asked, as the reference does, with a warning instead of an error."""
    if dims.is_multilingual:
        normalize_language(options.language, dims.num_languages)
        return
    if options.language not in (None, "en"):
        _warn(f"{name} is an English-only model; transcribing as English, not {options.language!r}")
    if options.task == "translate":
        _warn(f"{name} is an English-only model; it cannot translate, so it transcribes")


def _check_group_size(model: ModelEngine, options: TranscribeOptions) -> None:
    """Refuse beams or samples the engine cannot seat before any file starts, as the server does: the engine
    refused them only when a window got there (samples: when one fell back to a temperature above 0), so the
    same command failed on one file and not on another."""
    needed, limit = WindowDecoder(model, options).largest_group(), model.engine.max_group_size
    if needed > limit:
        raise InvalidRequest(
            f"--beam-size/--best-of {needed} needs {needed} decoder slots at once; this engine has {limit} "
            "(engine.max_slots)"
        )


def _warn(message: str) -> None:
    print(f"halkspeech: warning: {message}", file=sys.stderr)


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


@dataclass(frozen=True)
class Outcome:
    """One input's result: a transcript, or the one-line reason it failed."""

    path: str
    transcript: Transcript | None = None
    error: str | None = None


async def _transcribe_all(
    engines: Replicas,
    paths: Sequence[str],
    names: Sequence[str],
    options: TranscribeOptions,
    output: Output,
    jobs: int,
    progress: bool,
) -> int:
    """Run every file at once (at most `jobs` in flight) and emit results in input order; 1 if any failed. Each
    file runs on the least loaded engine (one per GPU) when its audio is decoded."""
    limit = asyncio.Semaphore(jobs)
    with _ProgressBar(progress) as bar:
        tasks = [asyncio.create_task(_transcribe_one(engines, path, options, limit, bar)) for path in paths]
        try:
            failed = False
            for task, name in zip(tasks, names, strict=True):
                outcome = await task
                with bar.printing():
                    failed |= not _emit(outcome, name, output)
            return 1 if failed else 0
        finally:
            for task in tasks:
                task.cancel()  # only matters when emitting raised: the rest then stop in the engine too
            await asyncio.gather(*tasks, return_exceptions=True)


async def _transcribe_one(
    engines: Replicas, path: str, options: TranscribeOptions, limit: asyncio.Semaphore, bar: _ProgressBar
) -> Outcome:
    async with limit:
        try:
            audio = await asyncio.to_thread(_read, path)
            model = engines.take()
            try:
                with bar.file(audio.size / SAMPLE_RATE) as progress:
                    transcript = await Transcriber(model).transcribe(audio, options, progress=progress)
            finally:
                engines.release(model)
            return Outcome(path, transcript=transcript)
        except HalkSpeechError as exc:
            return Outcome(path, error=str(exc))
        except Exception as exc:  # a bug, not bad input: one line here, the traceback with --log-level debug
            log.debug("transcribing %s failed", path, exc_info=True)
            return Outcome(path, error=f"internal error: {type(exc).__name__}: {exc}")


def _read(path: str) -> np.ndarray:
    """Samples [n] at 16 kHz mono; runs in a worker thread."""
    return decode_audio(sys.stdin.buffer.read() if path == STDIN else path)


def _emit(outcome: Outcome, name: str, output: Output) -> bool:
    if outcome.transcript is None:
        print(f"halkspeech: error: {outcome.path}: {outcome.error}", file=sys.stderr)
        return False
    try:
        output.write(outcome.path, name, outcome.transcript)
    except BrokenPipeError:
        raise  # stdout closed (`| head`): the whole command stops quietly (cli.main), not one error a file
    except OSError as exc:
        print(f"halkspeech: error: {outcome.path}: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


class _ProgressBar:
    """tqdm over the audio seconds of every decoded file, on stderr; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(total=0.0, file=sys.stderr, bar_format=_BAR_FORMAT, leave=False) if enabled else None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    @contextmanager
    def file(self, seconds: float) -> Iterator[Progress]:
        """A `progress(done_s, total_s)` callback for one file of `seconds`, adding to the shared bar."""
        done = 0.0

        def progress(done_s: float, total_s: float) -> None:
            nonlocal done
            step = min(done_s, seconds) - done
            done += step
            self._add(done=step)

        self._add(total=seconds)
        try:
            yield progress
        finally:
            self._add(done=seconds - done)  # finished or failed: none of it is left to do

    def printing(self) -> AbstractContextManager[object]:
        """Clears the bar while a result is printed, so output lines never interleave with it."""
        return tqdm.external_write_mode() if self.bar is not None else nullcontext()

    def _add(self, *, total: float = 0.0, done: float = 0.0) -> None:
        if self.bar is not None:
            self.bar.total += total
            self.bar.update(done)


_BAR_FORMAT = "transcribing: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]"
