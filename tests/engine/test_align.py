"""The device half of word timing equals the host path (and through it openai-whisper's steps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from whisper.timing import median_filter as reference_median_filter

from halkspeech.config import EngineSettings
from halkspeech.engine.align import _median7, cost_matrices
from halkspeech.engine.batch import Admission, AlignJob
from halkspeech.engine.factory import ALIGN_GRAPH_ROWS, alignment_graph_rows
from halkspeech.engine.request import Alignment, DecodeRequest, SamplingOptions
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.dims import ALIGNMENT_HEADS, KNOWN_DIMS, default_alignment_heads
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper
from halkspeech.transcription.alignment import alignment_matrix


def cost_matrix(scores: torch.Tensor, prompt_len: int, text_len: int, frames: int) -> torch.Tensor:
    """One window: scores [heads, ≥ prompt_len + text_len + 1, ≥ frames] → [text_len + 1, frames]."""
    return cost_matrices(scores[None], prompt_len, [text_len], [frames])[0, : text_len + 1, :frames]


@pytest.mark.parametrize("shape", [(3, 12, 4), (6, 40, 1500)])
def test_median_network_equals_reference(shape: tuple[int, int, int]) -> None:
    # (windows too short to pad, 3 frames or fewer, are left as they are: test_cost_matrix_equals_the_host_path)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1]))
    padded = F.pad(x, (3, 3), mode="reflect")
    torch.testing.assert_close(_median7(padded, shape[-1]), reference_median_filter(x, 7), rtol=0, atol=0)


@pytest.mark.parametrize(("text", "frames"), [(1, 1500), (37, 1500), (37, 611), (80, 4), (10, 3)])
def test_cost_matrix_equals_the_host_path(text: int, frames: int) -> None:
    prompt, heads = 4, 6
    scores = torch.randn(heads, prompt + text + 1, 1500, generator=torch.Generator().manual_seed(text)) * 4
    alignment = Alignment(scores=scores, text_probs=(0.5,) * text, text_tokens=(1,) * text, prompt_len=prompt)
    host = alignment_matrix(alignment, text, num_frames=2 * frames)  # the host counts mel frames
    device = cost_matrix(scores, prompt, text, frames)
    assert device.shape == (text + 1, frames)
    np.testing.assert_allclose(device.numpy(), host, rtol=1e-4, atol=1e-5)


def test_windows_at_once_equal_each_alone() -> None:
    # different text lengths and frame counts in one batch, one too short to filter (as the reference)
    prompt, heads, texts, frames = 4, 6, [37, 5, 60, 12], [1500, 611, 900, 3]
    scores = torch.randn(len(texts), heads, prompt + max(texts) + 1, 1500, generator=torch.Generator().manual_seed(1))
    batched = cost_matrices(scores * 4, prompt, texts, frames)
    for b, (k, f) in enumerate(zip(texts, frames, strict=True)):
        alone = cost_matrix(scores[b, :, : prompt + k + 1] * 4, prompt, k, f)
        torch.testing.assert_close(batched[b, : k + 1, :f], alone, rtol=1e-5, atol=1e-5)


def _admitted_runner(weights: LoadedWeights, **kwargs: Any) -> tuple[Runner, TokenIds, tuple[int, ...]]:
    """A CPU runner (tiny.en, float32) with five random windows admitted into slots 0-4, and the alignment
    prompt."""
    dims = weights.dims
    model = Whisper.from_openai_state_dict(dims, weights.state_dict, dtype=torch.float32, device="cpu")
    tokenizer = Tokenizer.for_model(dims)
    ids = TokenIds.from_tokenizer(tokenizer, dims.n_vocab)
    runner = Runner(model, ids, slots=5, cuda_graphs=False, alignment_heads=weights.alignment_heads, **kwargs)
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    features = torch.randn(5, dims.n_mels, 3000, generator=torch.Generator().manual_seed(0))
    options = SamplingOptions(max_new_tokens=4)
    admissions = [Admission(i, DecodeRequest(features[i], prompt, sot, options), (i,), 0) for i in range(5)]
    job = runner.encode_async([a.request.features for a in admissions])
    runner.admit(admissions, [(job, i) for i in range(5)])
    return runner, ids, prompt


def _jobs(
    ids: TokenIds, prompt: tuple[int, ...], lengths: Sequence[int], frames: Sequence[int | None]
) -> list[AlignJob]:
    generator = torch.Generator().manual_seed(1)
    return [
        AlignJob(i, tuple(prompt), tuple(torch.randint(0, ids.eot, (n,), generator=generator).tolist()), f)
        for i, (n, f) in enumerate(zip(lengths, frames, strict=True))
    ]


def test_a_pass_in_chunks_equals_each_window_alone(tiny_en_weights: LoadedWeights) -> None:
    """Runner.align_async splits a pass by windows and text tokens; the results must not depend on the split
    (nor on padding to the longest window of a chunk)."""
    runner, ids, prompt = _admitted_runner(tiny_en_weights)
    jobs = _jobs(ids, prompt, (3, 17, 9, 30, 1), (1500, 700, 1500, 40, 1200))
    whole = runner.align_async(jobs, max_jobs=2, max_rows=32).results()
    assert len(runner.align_async(jobs, max_jobs=2, max_rows=32).builders) == 3  # [3, 17] [9] [30, 1]
    for one, alignment in zip(jobs, whole, strict=True):
        alone = runner.align([one])[0]
        assert alignment.text_tokens == one.text and alignment.matrix is not None and alone.matrix is not None
        assert alignment.matrix.shape == (len(one.text) + 1, one.frames)
        torch.testing.assert_close(alignment.matrix, alone.matrix, rtol=1e-4, atol=1e-4)
        assert alignment.text_probs == pytest.approx(alone.text_probs, rel=1e-4, abs=1e-6)


def test_the_alignment_graphs_padded_pass_equals_the_eager_one(tiny_en_weights: LoadedWeights) -> None:
    """What an alignment graph runs (on a GPU; here its body, eagerly): rows padded to a power of two, tokens
    to a multiple of 32 and frames to the whole window give each window the eager pass's matrix and
    probabilities; passes it does not take (a window without frames, one too long) still run eagerly."""
    runner, ids, prompt = _admitted_runner(tiny_en_weights, alignment_graph_rows=4, alignment_prompt_len=2)
    assert len(prompt) == 2
    padded_calls: list[object] = []
    body = runner.aligner._body
    runner.aligner._body = lambda key: padded_calls.append(key) or body(key)  # type: ignore[method-assign]
    jobs = _jobs(ids, prompt, (3, 40, 9, 30, 1), (1500, 700, 1500, 3, 1200))
    graphed = runner.align_async(jobs).results()  # chunks of 4 and 1 (the graphs' rows): keys (4, 64), (1, 32)
    assert padded_calls == [(4, 64), (1, 32)]
    mixed = _jobs(ids, prompt, (3, 300, 5), (1500, 1500, None))  # too long; no frames (sequential mode)
    runner.align_async(mixed[:2]).results()  # the short window through the graph's body, the long one eagerly
    runner.align_async(mixed[2:]).results()
    assert padded_calls == [(4, 64), (1, 32), (1, 32)]
    runner.aligner.graph_rows = 0  # the eager pass, on the same cache
    for one, alignment in zip(jobs, graphed, strict=True):
        eager = runner.align([one])[0]
        assert alignment.matrix is not None and eager.matrix is not None
        assert alignment.matrix.shape == eager.matrix.shape == (len(one.text) + 1, one.frames)
        torch.testing.assert_close(alignment.matrix, eager.matrix, rtol=1e-4, atol=1e-4)
        assert alignment.text_probs == pytest.approx(eager.text_probs, rel=1e-4, abs=1e-6)


def test_passes_no_alignment_graph_takes_keep_their_eager_chunks(tiny_en_weights: LoadedWeights) -> None:
    """Sequential mode's windows (no frames) never replay an alignment graph: with the graphs on they still run
    eagerly in chunks of max_jobs, not of the graphs' rows (16 windows were 4 eager passes instead of one), and
    a pass mixing them with batched mode's returns every window's result in the jobs' order."""
    runner, ids, prompt = _admitted_runner(tiny_en_weights, alignment_graph_rows=4, alignment_prompt_len=2)
    sequential = _jobs(ids, prompt, (3, 5, 7, 2, 4), (None,) * 5)
    assert len(runner.align_async(sequential).builders) == 1
    mixed = _jobs(ids, prompt, (3, 5, 7, 2, 4), (None, 1500, None, 700, 40))
    together = runner.align_async(mixed)
    assert len(together.builders) == 2  # [1500, 700, 40] through the padded body, [None, None] eagerly
    for one, alignment in zip(mixed, together.results(), strict=True):
        alone = runner.align([one])[0]
        assert alignment.text_tokens == one.text
        assert (alignment.matrix is None) == (one.frames is None) == (alignment.scores is not None)
        assert alignment.text_probs == pytest.approx(alone.text_probs, rel=1e-4, abs=1e-6)


def test_alignment_graphs_only_for_few_heads() -> None:
    """The graphs' pool grows with the alignment heads, and the engine reserves it before sizing its decoder
    slots. OpenAI's fallback for a checkpoint naming none (320 heads for large-v2's shape, ~50 GB of pool) runs
    its passes eagerly instead; every catalog model's heads (large-v2's 23 the most) keep the graphs."""
    settings = EngineSettings()
    assert all(alignment_graph_rows(settings, len(heads)) == ALIGN_GRAPH_ROWS for heads in ALIGNMENT_HEADS.values())
    assert alignment_graph_rows(settings, len(default_alignment_heads(KNOWN_DIMS["large-v2"]))) == 0
    assert alignment_graph_rows(settings.model_copy(update={"alignment_graphs": False}), 10) == 0
