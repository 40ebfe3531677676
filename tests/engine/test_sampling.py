"""The batch-wide logit policies equal the reference's per-row filters on random histories."""

from __future__ import annotations

import random

import torch
from whisper.decoding import ApplyTimestampRules, SuppressBlank, SuppressTokens
from whisper.tokenizer import get_tokenizer

from halkspeech.engine.sampling import Sampler, SlotState, TokenIds
from halkspeech.model.tokenizer import Tokenizer

VOCAB = 51865


def _histories(tok: Tokenizer, rows: int, rng: random.Random) -> list[list[int]]:
    """Sampled-token histories mixing text tokens, pairs of timestamps and single timestamps."""
    histories = []
    for _ in range(rows):
        length = rng.choice([0, 1, 2, 3, 5, 8])
        seq: list[int] = []
        ts = tok.timestamp_begin + rng.randint(0, 20)
        for _ in range(length):
            if rng.random() < 0.4:
                ts += rng.randint(0, 30)
                seq.append(min(ts, VOCAB - 1))
            else:
                seq.append(rng.randint(0, tok.eot - 1))
        histories.append(seq)
    return histories


def _state(tok: Tokenizer, prompt: list[int], histories: list[list[int]], *, max_initial: int) -> SlotState:
    state = SlotState.allocate(len(histories), VOCAB, "cpu")
    for i, seq in enumerate(histories):
        state.tokens[i] = seq[-1] if seq else prompt[-1]
        state.prev[i] = seq[-2] if len(seq) > 1 else -1
        state.n_gen[i] = len(seq)
        stamps = [t for t in seq if t >= tok.timestamp_begin]
        state.last_ts[i] = stamps[-1] if stamps else -1
    state.ts_rules[:] = True
    state.blank[:] = True
    state.max_initial[:] = tok.timestamp_begin + max_initial
    state.suppress[:, list(tok.suppress_tokens())] = True
    return state


def test_policies_match_reference_filters() -> None:
    tok = Tokenizer(multilingual=True, num_languages=99)
    ref_tok = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    rng = random.Random(0)
    prompt = list(tok.sot_sequence("en", "transcribe"))
    ids = TokenIds.from_tokenizer(tok, VOCAB)
    sampler = Sampler(ids, torch.device("cpu"))
    for trial in range(20):
        histories = _histories(tok, 8, rng)
        # every row of one reference call shares a history length, so group rows by length
        for length in sorted({len(h) for h in histories}):
            rows = [h for h in histories if len(h) == length]
            logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(trial)) * 3
            expected = logits.clone()
            tokens = torch.tensor([prompt + h for h in rows])
            for policy in (
                SuppressBlank(ref_tok, len(prompt)),
                SuppressTokens(list(tok.suppress_tokens())),
                ApplyTimestampRules(ref_tok, len(prompt), 50),
            ):
                policy.apply(expected, tokens)
            ours = logits.clone()
            sampler.filter(ours, _state(tok, prompt, rows, max_initial=50), timestamps=True)
            assert torch.equal(torch.isinf(ours), torch.isinf(expected)), f"trial {trial}, length {length}"
            assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_rows_without_timestamp_rules_are_left_to_the_other_policies() -> None:
    """A step with timestamps applies their rules to the rows that asked for them only."""
    tok = Tokenizer(multilingual=True, num_languages=99)
    prompt = list(tok.sot_sequence("en", "transcribe"))
    sampler = Sampler(TokenIds.from_tokenizer(tok, VOCAB), torch.device("cpu"))
    histories = _histories(tok, 16, random.Random(1))
    state = _state(tok, prompt, histories, max_initial=50)
    state.ts_rules[::2] = False
    logits = torch.randn(len(histories), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    with_rules, without = logits.clone(), logits.clone()
    sampler.filter(with_rules, state, timestamps=True)
    sampler.filter(without, state, timestamps=False)
    assert torch.equal(with_rules[::2], without[::2])
    assert not torch.equal(with_rules[1::2], without[1::2])


def test_greedy_and_sampled_rows_share_a_step() -> None:
    tok = Tokenizer(multilingual=False, num_languages=99)
    sampler = Sampler(TokenIds.from_tokenizer(tok, 51864), torch.device("cpu"))
    state = SlotState.allocate(4, 51864, "cpu")
    state.n_gen[:] = 3
    state.temperature[2:] = 1.0
    # The rest 50 below the top: at -10 (20 below), 51,862 such tokens together had e^-20 each, about a 3%
    # chance that one of the 400 draws took one (a correct sample that failed the test once).
    logits = torch.full((4, 51864), -40.0)
    logits[:, 7] = 10.0  # dominant token
    logits[:, 11] = 9.5  # close second: sampled rows pick it sometimes
    draws = [sampler.sample(logits.clone(), state, timestamps=False, sampling=True)[0] for _ in range(200)]
    picked = torch.stack(draws)  # [200, 4]
    assert (picked[:, :2] == 7).all(), "greedy rows always take the argmax"
    assert set(picked[:, 2:].unique().tolist()) == {7, 11}, "sampled rows draw from the distribution"


def test_force_length_never_ends() -> None:
    tok = Tokenizer(multilingual=False, num_languages=99)
    sampler = Sampler(TokenIds.from_tokenizer(tok, 51864), torch.device("cpu"))
    state = SlotState.allocate(2, 51864, "cpu")
    state.n_gen[:] = 5
    state.no_eot[0] = True
    logits = torch.zeros(2, 51864)
    logits[:, tok.eot] = 50.0
    tokens, _, _ = sampler.sample(logits, state, timestamps=False, sampling=False)
    assert tokens[0] != tok.eot and tokens[1] == tok.eot


def test_a_tiny_temperature_samples_like_greedy_not_the_first_positive_logit() -> None:
    """logits / T overflowed float32 for T ≤ ~1e-37 (accepted: the API takes any finite 0 ≤ T ≤ 1): every
    positive logit became +inf and the draw took the first of them, e.g. "!!!" for the JFK clip."""
    tok = Tokenizer(multilingual=False, num_languages=99)
    sampler = Sampler(TokenIds.from_tokenizer(tok, 51864), torch.device("cpu"))
    state = SlotState.allocate(2, 51864, "cpu")
    state.n_gen[:] = 3
    state.temperature[:] = 1e-38
    assert (state.temperature > 0).all()  # representable in float32 (a denormal): a sampled row
    logits = torch.full((2, 51864), -5.0)
    logits[:, 0] = 5.0  # a lesser logit before the best one (both overflowed to +inf)
    logits[:, 7] = 10.0
    tokens, _, _ = sampler.sample(logits, state, timestamps=False, sampling=True)
    assert tokens.tolist() == [7, 7]
