"""The runner on a GPU (skipped without one): encoder, admission and alignment graphs give the eager encoder's,
admission's and word-timing pass's results; an admission and a decode step wait for the device once each, to read
their results, and a word-timing pass not at all."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from halkspeech.engine.batch import Admission, AlignJob, DecodeStep
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.engine.transfer import to_device
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import random_weights
from halkspeech.model.whisper import Whisper

from .test_runner import make_runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def tiny_runner(
    encoder_graph_batch: int = 0, admission_graph_batch: int = 0, model: Whisper | None = None
) -> tuple[Runner, Tokenizer]:
    """Random tiny.en weights in float16 (what is tested does not depend on the values), 8 slots."""
    if model is None:
        weights = random_weights("tiny.en", device="cuda")
        model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=torch.float16, device="cuda")
    return make_runner(model, admission_graph_batch, encoder_graph_batch)


def syncs(call: Callable[[], object]) -> int:
    """How many times `call()` synchronised the host with the device (PyTorch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_host_values_go_up_without_waiting_for_the_device() -> None:
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(20):
        busy = busy @ busy / 64  # work queued ahead of the copy
    assert syncs(lambda: to_device([[1, 2], [3, 4]], torch.long, device)) == 0
    flags, index = torch.zeros(4, dtype=torch.bool, device=device), torch.ones(2, dtype=torch.long, device=device)
    assert syncs(lambda: flags.index_fill_(0, index, True)) == 0


def test_encoder_graphs_give_the_eager_encoder_output() -> None:
    runner, _ = tiny_runner(encoder_graph_batch=4)
    assert runner.warm_up([1], [32]) == 2 + 4  # two step graphs (with and without timestamps), four encoder runs
    mel = torch.randn(6, 80, 3000, device="cuda")
    with runner.stream_context(), torch.inference_mode():
        for n in (1, 3, 4):
            graphed = runner.encode(mel[:n])
            eager = runner.model.encoder(mel[:n].half())
            torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-3)
        first = runner.encode(mel[:2])
        second = runner.encode(mel[2:4])  # a second replay of the same graph must not overwrite the first run
        torch.testing.assert_close(first, runner.model.encoder(mel[:2].half()), rtol=1e-3, atol=1e-3)
        assert not torch.equal(first, second)
        assert runner.encode(mel).shape == (6, 1500, 384)  # beyond the graphs: eager


def test_an_admission_and_a_step_wait_for_the_device_once() -> None:
    # Before engine/transfer.py an admission of two windows synchronised 16 times, each time idling the GPU
    # while the engine thread prepared the next launches.
    runner, tokenizer = tiny_runner()
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=True)
    options = SamplingOptions(suppress_tokens=tokenizer.suppress_tokens())
    mel = torch.randn(2, 80, 3000, device="cuda")

    def admit(first_slot: int) -> None:
        job = runner.encode_async(list(mel))
        request = DecodeRequest(mel[0], prompt, sot, options)
        runner.admit([Admission(first_slot + i, request, (first_slot + i,), 0) for i in range(2)], [(job, 0), (job, 1)])

    step = DecodeStep(size=4, window=32, active=(0, 1, 2, 3), timestamps=True, sampling=False)
    with runner.stream_context():
        admit(0)
        runner.step(step)  # captures the step's graph (a capture synchronises), outside the count
        counts = (syncs(lambda: admit(2)), syncs(lambda: runner.step(step)), syncs(lambda: runner.release([0, 1])))
        assert counts[0] <= 1 and counts[1] <= 1 and counts[2] == 0, f"(admit, step, release) synchronised {counts}"


def test_admission_graphs_give_the_eager_admission() -> None:
    graphed, tokenizer = tiny_runner(admission_graph_batch=4)
    eager, _ = tiny_runner(model=graphed.model)
    assert graphed.warm_up([1], [32]) == 2 + 3 * 2  # two step graphs; rows 1, 2, 4 × prompts with/without timestamps
    mel = torch.randn(3, 80, 3000, device="cuda")
    suppress = tokenizer.suppress_tokens()
    slots = (5, 1, 6)
    with graphed.stream_context():
        for runner in (graphed, eager):
            job = runner.encode_async(list(mel))
            admissions = []
            for i, slot in enumerate(slots):
                prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=i == 1)
                request = DecodeRequest(mel[i], prompt, sot, SamplingOptions(suppress_tokens=suppress))
                admissions.append(Admission(i, request, (slot,), 0))
            results = runner.admit(admissions, [(job, i) for i in range(3)])
            assert len(results) == 3
        assert graphed.admit_graphs is not None and len(graphed.admit_graphs) == 6  # replayed, none captured
        assert graphed._admit_ints[:4, 0].tolist() == [*slots, slots[-1]]
        for slot in slots:
            torch.testing.assert_close(
                graphed.cache.cross_k[:, slot], eager.cache.cross_k[:, slot], rtol=2e-3, atol=2e-3
            )
            torch.testing.assert_close(
                graphed.cache.self_kv[:, slot], eager.cache.self_kv[:, slot], rtol=2e-3, atol=2e-3
            )
        for slot in set(range(8)) - {0, *slots}:  # the padding row wrote nowhere else (slot 0: the captures' run)
            assert not graphed.cache.cross_k[:, slot].any()
        job = graphed.encode_async(list(mel))
        request = admissions[0].request
        assert syncs(lambda: graphed.admit([Admission(9, request, (7,), 0)], [(job, 0)])) <= 1


def test_alignment_graphs_give_the_eager_pass_and_queue_it_without_a_wait() -> None:
    weights = random_weights("tiny.en", device="cuda")
    model = Whisper.from_openai_state_dict(weights.dims, weights.state_dict, dtype=torch.float16, device="cuda")
    tokenizer = Tokenizer.for_model(weights.dims)
    ids = TokenIds.from_tokenizer(tokenizer, weights.dims.n_vocab)
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False)
    runner = Runner(
        model,
        ids,
        slots=8,
        alignment_heads=weights.alignment_heads,
        alignment_graph_rows=4,
        alignment_prompt_len=len(prompt),
    )
    assert runner.warm_up([1], [32]) == 2 + 3 * 8  # two step graphs; rows 1, 2, 4 × widths 32, 64, ..., 256
    mel = torch.randn(5, 80, 3000, device="cuda")
    generator = torch.Generator().manual_seed(0)
    lengths, frames = (3, 40, 220, 9, 100), (1500, 700, 1500, 3, 1200)
    jobs = [
        AlignJob(i, tuple(prompt), tuple(torch.randint(0, ids.eot, (n,), generator=generator).tolist()), f)
        for i, (n, f) in enumerate(zip(lengths, frames, strict=True))
    ]
    with runner.stream_context():
        options = SamplingOptions(max_new_tokens=4)
        admissions = [Admission(i, DecodeRequest(mel[i], prompt, sot, options), (i,), 0) for i in range(5)]
        job = runner.encode_async(list(mel))
        runner.admit(admissions, [(job, i) for i in range(5)])
        assert syncs(lambda: runner.align_async(jobs)) == 0
        graphed = runner.align_async(jobs).results()
        assert runner.aligner.graphs is not None and len(runner.aligner.graphs) == 24  # replayed, none captured
        runner.aligner.graph_rows = 0  # the eager pass, in the same chunks (fp16 sums depend on the batch)
        eager = runner.align_async(jobs, max_jobs=4).results()
    for one, g, e in zip(jobs, graphed, eager, strict=True):
        assert g.matrix is not None and e.matrix is not None
        assert g.matrix.shape == e.matrix.shape == (len(one.text) + 1, one.frames)
        torch.testing.assert_close(g.matrix, e.matrix, rtol=1e-4, atol=1e-4)
        assert g.text_probs == pytest.approx(e.text_probs, rel=1e-3, abs=1e-6)
