"""Word timing's host half in worker processes: the same words as in this process, and a dead worker replaced."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor

import torch

from halkspeech.engine.request import Alignment
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.transcription.word_workers import WindowWords, run_window_words, time_window_words, word_executor


def _job() -> WindowWords:
    tokenizer = Tokenizer(multilingual=False, num_languages=0)
    text = tuple(tokenizer.encode(" And so, my fellow Americans, ask not."))
    frames = 200  # encoder positions: 4 s
    # a cost matrix whose cheapest path walks the diagonal, with noise (negated, as the engine returns it)
    rows = torch.arange(len(text) + 1)[:, None] * frames / (len(text) + 1)
    matrix = -((torch.arange(frames)[None, :] - rows).abs() / 20) + 0.1 * torch.randn(len(text) + 1, frames)
    alignment = Alignment(None, (0.9,) * len(text), text, prompt_len=2, matrix=matrix.float())
    spans = [(0.0, 4.0, len(text))]
    return WindowWords.of(alignment, tokenizer, "en", spans, num_frames=2 * frames, time_offset=0.0, last_speech=0.0)


def test_workers_give_the_words_of_this_process_and_survive_a_dead_worker() -> None:
    job = _job()
    here, _ = run_window_words(job)
    words = [w.word for w in here[0].words]
    assert "".join(words) == " And so, my fellow Americans, ask not."
    starts = [w.start for w in here[0].words]
    assert starts == sorted(starts) and starts[0] >= 0.0 and here[0].words[-1].end <= 4.0

    in_worker, _ = asyncio.run(time_window_words(job, 1))
    assert in_worker == here

    pool = word_executor(1)
    assert isinstance(pool, ProcessPoolExecutor)
    for process in list(pool._processes.values()):  # a worker killed (say, by the OOM killer)
        process.kill()
        process.join()
    again, _ = asyncio.run(time_window_words(job, 1))
    assert again == here
    assert word_executor(1) is not pool  # replaced, once
