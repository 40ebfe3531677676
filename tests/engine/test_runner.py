"""The runner on the CPU with the real tiny.en weights: an admission through the admission graphs' static,
padded inputs (on a GPU a captured graph replays that body) gives the eager admission's first tokens, cache and
next steps; admissions the graphs do not cover run eagerly; sequences a compaction moves decode as if they had
stayed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from halkspeech.audio import decode_audio, log_mel_spectrogram, pad_or_trim
from halkspeech.engine.batch import Admission, AdmitResult, DecodeStep, SlotMove
from halkspeech.engine.factory import task_prompt_widths
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.runner import SUPPRESS_ROWS, Runner
from halkspeech.engine.sampling import TokenIds
from halkspeech.model.tokenizer import Tokenizer
from halkspeech.model.weights import LoadedWeights
from halkspeech.model.whisper import Whisper

TEST_DATA = Path(__file__).resolve().parents[1] / "data"
CLIPS = ("jfk.flac", "LJ001-0002.wav", "1089-134691-0000.flac")
SLOTS = (5, 1, 6)  # not in order, not from 0: the rows' slots come from the inputs


@pytest.fixture(scope="module")
def model(tiny_en_weights: LoadedWeights) -> Whisper:
    return Whisper.from_openai_state_dict(tiny_en_weights.dims, tiny_en_weights.state_dict)


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    """The first 30 s log-mel window of three committed clips: [3, 80, 3000]."""
    windows = []
    for name in CLIPS:
        audio = decode_audio(TEST_DATA / name)
        windows.append(pad_or_trim(log_mel_spectrogram(audio, 80, padding=480_000)[:, :3000], 3000))
    return torch.stack(windows)


def make_runner(
    model: Whisper, admission_graph_batch: int = 0, encoder_graph_batch: int = 0
) -> tuple[Runner, Tokenizer]:
    """A runner of 8 slots whose admission graphs (if any) take the model's task prompts, as the factory's."""
    tokenizer = Tokenizer.for_model(model.dims)
    ids = TokenIds.from_tokenizer(tokenizer, model.dims.n_vocab)
    runner = Runner(
        model,
        ids,
        slots=8,
        encoder_graph_batch=encoder_graph_batch,
        admission_graph_batch=admission_graph_batch,
        admission_widths=task_prompt_widths(tokenizer),
    )
    return runner, tokenizer


def admit_and_decode(
    runner: Runner, tokenizer: Tokenizer, mel: torch.Tensor, steps: int, beams: bool = False
) -> tuple[list[AdmitResult], list[tuple[int, ...]]]:
    """Admit the windows into SLOTS (the second with timestamp rules: a shorter prompt, so rows are padded to
    the longest), then decode `steps` steps; returns the admission's results and each step's tokens."""
    suppress = tokenizer.suppress_tokens()
    job = runner.encode_async(list(mel))
    admissions = []
    for i, slot in enumerate(SLOTS):
        prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=i == 1)
        options = SamplingOptions(suppress_tokens=suppress, timestamps=i == 1)
        slots = (slot, slot + 1) if beams and i == 0 else (slot,)
        admissions.append(Admission(i, DecodeRequest(mel[i], prompt, sot, options), slots, 2 if len(slots) > 1 else 0))
    results = runner.admit(admissions, [(job, i) for i in range(len(SLOTS))])
    active = tuple(sorted(s for a in admissions for s in a.slots))
    step = DecodeStep(size=8, window=32, active=active, timestamps=True, sampling=False)
    tokens = [runner.step(step).tokens for _ in range(steps)]
    return results, [tuple(t[s] for s in active) for t in tokens]


def test_a_padded_admission_equals_the_eager_one(model: Whisper, mel: torch.Tensor) -> None:
    eager, tokenizer = make_runner(model, admission_graph_batch=0)
    padded, _ = make_runner(model, admission_graph_batch=4)  # three rows, padded to four by repeating the last
    with torch.inference_mode():
        want, want_steps = admit_and_decode(eager, tokenizer, mel, steps=12)
        got, got_steps = admit_and_decode(padded, tokenizer, mel, steps=12)
    assert padded._admit_ints[:4, 0].tolist() == [*SLOTS, SLOTS[-1]]  # it went through the padded inputs
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert got_steps == want_steps
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert g.no_speech_prob == pytest.approx(w.no_speech_prob, abs=1e-4)
    for slot in SLOTS:  # the same cross keys/values and prompt keys/values in each admitted slot
        torch.testing.assert_close(padded.cache.cross_k[:, slot], eager.cache.cross_k[:, slot], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(padded.cache.self_kv[:, slot], eager.cache.self_kv[:, slot], rtol=1e-4, atol=1e-4)
    for slot in set(range(8)) - set(SLOTS):  # the padding row wrote nowhere else
        assert not padded.cache.cross_k[:, slot].any()


def test_admissions_the_graphs_do_not_cover_run_eagerly(model: Whisper, mel: torch.Tensor) -> None:
    padded, tokenizer = make_runner(model, admission_graph_batch=4)
    eager, _ = make_runner(model, admission_graph_batch=0)
    prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=True)
    plain = Admission(0, DecodeRequest(mel[0], prompt, sot, SamplingOptions()), (0,), 0)
    assert padded._graphable([plain])
    assert not padded._graphable([plain] * 5)  # more rows than the largest graph
    assert not padded._graphable([Admission(0, plain.request, (0, 1), 2)])  # beams share one window
    long_prompt, long_sot = tokenizer.decoder_prompt("en", "transcribe", previous=list(range(300, 320)))
    assert not padded._graphable([Admission(0, DecodeRequest(mel[0], long_prompt, long_sot), (0,), 0)])
    with torch.inference_mode():  # a beam admission among plain ones: all of them eagerly, as before
        want, want_steps = admit_and_decode(eager, tokenizer, mel, steps=4, beams=True)
        got, got_steps = admit_and_decode(padded, tokenizer, mel, steps=4, beams=True)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert got_steps == want_steps


def test_sequences_moved_by_a_compaction_decode_as_if_they_had_stayed(model: Whisper, mel: torch.Tensor) -> None:
    """On a GPU the scheduler moves high slots down when that shrinks the step's bucket (the CPU engine has no
    buckets, so it never does): three moves in one step take their caches and state along. The prompts differ in
    length (one has previous text), so the moves are at positions 21 apart: a copy of each slot's keys up to the
    shortest move's position would cut the others short."""
    stay, tokenizer = make_runner(model)
    moved, _ = make_runner(model)
    pairs = ((6, 2), (5, 3), (1, 0))
    suppress = tokenizer.suppress_tokens()
    admissions = []
    for i, slot in enumerate((5, 1, 6)):
        previous = list(range(300, 320)) if i == 2 else None
        prompt, sot = tokenizer.decoder_prompt("en", "transcribe", timestamps=False, previous=previous)
        request = DecodeRequest(mel[i], prompt, sot, SamplingOptions(suppress_tokens=suppress, timestamps=False))
        admissions.append(Admission(i, request, (slot,), 0))
    unmoved = DecodeStep(size=8, window=64, active=(1, 5, 6), timestamps=False, sampling=False)
    with torch.inference_mode():
        for runner in (stay, moved):
            runner.admit(admissions, [(runner.encode_async(list(mel)), i) for i in range(3)])
            for _ in range(3):
                runner.step(unmoved)
        moves = tuple(SlotMove(s, d, int(moved.state.positions[s])) for s, d in pairs)
        assert max(m.position for m in moves) - min(m.position for m in moves) == 21  # <|startofprev|> + 20
        compact = DecodeStep(size=8, window=64, active=(0, 2, 3), timestamps=False, sampling=False)
        want = [stay.step(unmoved).tokens for _ in range(5)]
        got = [moved.step(dataclasses.replace(compact, moves=moves if i == 0 else ())).tokens for i in range(5)]
    assert [tuple(t[s] for s, _ in pairs) for t in want] == [tuple(t[d] for _, d in pairs) for t in got]
    assert len({t[6] for t in want}) > 1  # the rows decode text, not one token over and over
    for source, dest in pairs:
        position = int(stay.state.positions[source])
        assert int(moved.state.positions[dest]) == position and not moved.state.active[source]
        assert torch.equal(moved.state.ints[dest], stay.state.ints[source])
        assert torch.equal(moved.state.flags[dest], stay.state.flags[source])
        assert torch.equal(moved.state.suppress[dest], stay.state.suppress[source])
        assert torch.equal(moved.cache.cross_k[:, dest], stay.cache.cross_k[:, source])
        assert torch.equal(moved.cache.cross_v[:, dest], stay.cache.cross_v[:, source])
        torch.testing.assert_close(
            moved.cache.self_kv[:, dest, :position], stay.cache.self_kv[:, source, :position], rtol=1e-5, atol=1e-5
        )
    assert moved.state.active[[0, 2, 3]].all() and not moved.state.active[[1, 4, 5, 6, 7]].any()


def test_suppress_masks_are_kept_for_the_recent_sets_only(model: Whisper) -> None:
    """A library caller with a new suppress set per request grew the cache of [vocab] masks without bound."""
    runner, _ = make_runner(model)
    for first in range(40):
        row = runner._suppress_row((first, 100 + first))
        assert row.sum() == 2 and row[first] and row[100 + first]
    assert len(runner._suppress_rows) == SUPPRESS_ROWS
    assert (39, 139) in runner._suppress_rows and (0, 100) not in runner._suppress_rows
