"""The one-kernel greedy sampler (engine/fused_sampling.py) equals the PyTorch policies, sampling and advance
it replaces (sampling.py), in Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from halkspeech.engine.sampling import Sampler, SlotState, TokenIds
from halkspeech.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("triton_interpreter")

VOCAB = 51864


def _state(rows: int, tok: Tokenizer, generator: torch.Generator) -> SlotState:
    """Rows with and without blank suppression, at their first token or later, forced or free length, active
    or idle, each with its own suppressed tokens."""
    state = SlotState.allocate(rows, VOCAB, "cpu")
    state.tokens[:] = torch.randint(0, tok.eot, (rows,), generator=generator)
    state.positions[:] = torch.randint(3, 40, (rows,), generator=generator)
    state.n_gen[:] = torch.tensor([0, 3] * (rows // 2))
    state.prev[:] = torch.where(state.n_gen > 1, 7, -1)
    state.blank[:] = torch.tensor([True, True, False, True] * (rows // 4))
    state.no_eot[:] = torch.tensor([False, True] * (rows // 2))
    state.active[:] = torch.tensor([True, True, True, False] * (rows // 4))
    state.suppress[:, list(tok.suppress_tokens())] = True
    state.suppress[1, 100:200] = True
    return state


def test_fused_greedy_equals_policies_sampling_and_advance() -> None:
    tok = Tokenizer(multilingual=False, num_languages=99)
    ids = TokenIds.from_tokenizer(tok, VOCAB)
    generator = torch.Generator().manual_seed(0)
    rows = 8
    logits = torch.randn(rows, VOCAB, generator=generator) * 3
    logits[0, tok.encode(" ")[0]] = 50.0  # blank on top: suppressed at the first token
    logits[1, tok.eot] = 60.0  # end-of-text on top: suppressed where the length is forced
    logits[2, [900, 40_000]] = 70.0  # a tie: the first index wins, as torch.argmax
    logits[3, 150] = 80.0  # suppressed in row 1 only; row 3 is idle and keeps its state
    logits[4, tok.timestamp_begin + 5] = 90.0  # a timestamp: becomes the row's last timestamp
    state = _state(rows, tok, generator)
    plain_state = SlotState(*(t.clone() for t in state.tensors()))

    want_tokens, want_chosen, want_logprobs = Sampler(ids, torch.device("cpu")).step(
        logits.clone(), plain_state, timestamps=False, sampling=False
    )
    fused = Sampler(ids, torch.device("cpu"), fused_slots=rows)
    got_logits = logits.clone()
    tokens, chosen, scores = fused.step(got_logits, state, timestamps=False, sampling=False)

    assert tokens.tolist() == want_tokens.tolist()
    assert tokens[2] == 900 and tokens[4] == tok.timestamp_begin + 5
    torch.testing.assert_close(chosen, want_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.log_softmax(scores, dim=-1), want_logprobs, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(state.tensors(), plain_state.tensors(), strict=True):
        assert torch.equal(mine, theirs)
    assert state.last_ts[4] == tok.timestamp_begin + 5 and state.tokens[3] == plain_state.tokens[3]
    assert not fused.fused.count.any()  # the per-row counts are left zero for the next step


class _Forbidden:
    """Stands in for the kernel where it must not run."""

    def __call__(self, *args: object) -> None:
        raise AssertionError("the fused kernel ran on a step with timestamps or sampling")


def test_timestamps_and_sampling_keep_the_pytorch_path() -> None:
    """The kernel covers greedy, timestamp-free steps only; the others go through the policies as before."""
    tok = Tokenizer(multilingual=False, num_languages=99)
    ids = TokenIds.from_tokenizer(tok, VOCAB)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=generator)
    state = _state(4, tok, generator)
    plain, fused = Sampler(ids, torch.device("cpu")), Sampler(ids, torch.device("cpu"), fused_slots=4)
    assert fused.fused is not None
    fused.fused = _Forbidden()  # type: ignore[assignment]
    for timestamps, sampling in ((True, False), (False, True)):
        results = []
        for sampler in (plain, fused):
            torch.manual_seed(0)
            copy = SlotState(*(t.clone() for t in state.tensors()))
            results.append(sampler.step(logits.clone(), copy, timestamps=timestamps, sampling=sampling)[0])
        assert results[0].tolist() == results[1].tolist()
