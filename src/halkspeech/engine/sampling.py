"""Logit policies and sampling on the whole batch, on the model's device, with per-row options.

Every policy works on logits [B, V] in place and reads per-slot state [B], so rows with different settings
(greedy and sampled, with and without timestamps) share one decode step, and nothing here synchronises with
the host: the step can be captured in a CUDA graph. The semantics are the reference implementation's
(openai-whisper `SuppressBlank`, `SuppressTokens`, `ApplyTimestampRules`, `GreedyDecoder`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from halkspeech.engine.fused_sampling import FusedGreedy
from halkspeech.model.tokenizer import Tokenizer

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TokenIds:
    """The token ids the policies need, taken from the model's tokenizer."""

    eot: int
    sot: int
    timestamp_begin: int
    no_timestamps: int
    no_speech: int
    blank: tuple[int, ...]  # suppressed as a first token: " " and end-of-text
    language_tokens: tuple[int, ...]
    language_codes: tuple[str, ...]
    vocab: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab: int) -> TokenIds:
        return cls(
            eot=tokenizer.eot,
            sot=tokenizer.sot,
            timestamp_begin=tokenizer.timestamp_begin,
            no_timestamps=tokenizer.no_timestamps,
            no_speech=tokenizer.no_speech,
            blank=(*tokenizer.encode(" "), tokenizer.eot),
            language_tokens=tokenizer.language_tokens,
            language_codes=tokenizer.language_codes,
            vocab=vocab,
        )


INT_FIELDS = ("tokens", "positions", "prev", "n_gen", "last_ts", "max_initial")
FLAG_FIELDS = ("ts_rules", "blank", "no_eot", "active")


class _Column:
    """A field of SlotState: the column of one of its packed tensors that the field's name holds in `fields`,
    as an [S] view (writes to it write the packed tensor)."""

    def __init__(self, packed: str, fields: tuple[str, ...]) -> None:
        self.packed, self.fields, self.index = packed, fields, -1

    def __set_name__(self, owner: type, name: str) -> None:
        self.index = self.fields.index(name)

    def __get__(self, state: SlotState, owner: type | None = None) -> Tensor:
        return getattr(state, self.packed)[:, self.index]

    def __set__(self, state: SlotState, value: Tensor) -> None:
        raise AttributeError(f"write into the column (state.{self.fields[self.index]}[...] = ...), not over it")


@dataclass
class SlotState:
    """Per-slot decoding state on the device. Row i belongs to slot i; `rows` selects some.

    Packed in four tensors, so that writing a slot's whole state (an admission, a slot move) is four copies, not
    one per field (each copy is a torch call on the engine thread, which must then win the GIL back):
    ints:        [S, 6] long   columns INT_FIELDS:
        tokens       the next input token (the last token sampled, or the prompt's last)
        positions    the position of that token
        prev         the sampled token before `tokens` (-1 if fewer than two were sampled)
        n_gen        tokens sampled so far
        last_ts      the last timestamp token sampled (-1 if none)
        max_initial  the last timestamp token allowed first
    flags:       [S, 4] bool   columns FLAG_FIELDS:
        ts_rules     apply the timestamp rules
        blank        suppress blank as the first token
        no_eot       never end (forced length, benchmarks)
        active       the slot is decoding (idle slots in a step's range are computed and ignored)
    temperature: [S] float  0 for greedy
    suppress:    [S, V] bool tokens never sampled
    Each field is a column view (`state.tokens` is ints[:, 0]); writes to it write the packed tensor.
    """

    ints: Tensor
    flags: Tensor
    temperature: Tensor
    suppress: Tensor

    @classmethod
    def allocate(cls, slots: int, vocab: int, device: torch.device | str) -> SlotState:
        ints = torch.zeros(slots, len(INT_FIELDS), dtype=torch.long, device=device)
        state = cls(
            ints=ints,
            flags=torch.zeros(slots, len(FLAG_FIELDS), dtype=torch.bool, device=device),
            temperature=torch.zeros(slots, device=device),
            suppress=torch.zeros(slots, vocab, dtype=torch.bool, device=device),
        )
        state.prev.fill_(-1)
        state.last_ts.fill_(-1)
        state.max_initial.fill_(vocab - 1)
        return state

    def rows(self, index: slice | Tensor) -> SlotState:
        """The state of some slots: a view for a slice, a copy for an index tensor."""
        return SlotState(self.ints[index], self.flags[index], self.temperature[index], self.suppress[index])

    def write(self, slots: Tensor, rows: SlotState) -> None:
        """Put `rows` (the state of len(slots) slots) into those slots."""
        for mine, theirs in zip(self.tensors(), rows.tensors(), strict=True):
            mine[slots] = theirs

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.ints, self.flags, self.temperature, self.suppress

    tokens = _Column("ints", INT_FIELDS)
    positions = _Column("ints", INT_FIELDS)
    prev = _Column("ints", INT_FIELDS)
    n_gen = _Column("ints", INT_FIELDS)
    last_ts = _Column("ints", INT_FIELDS)
    max_initial = _Column("ints", INT_FIELDS)
    ts_rules = _Column("flags", FLAG_FIELDS)
    blank = _Column("flags", FLAG_FIELDS)
    no_eot = _Column("flags", FLAG_FIELDS)
    active = _Column("flags", FLAG_FIELDS)


class LogitPolicy(ABC):
    """Masks logits [B, V] in place according to per-row state."""

    @abstractmethod
    def apply(self, logits: Tensor, state: SlotState) -> None: ...


class SuppressTokens(LogitPolicy):
    def apply(self, logits: Tensor, state: SlotState) -> None:
        logits.masked_fill_(state.suppress, NEG_INF)


class SuppressBlank(LogitPolicy):
    """No blank and no end-of-text as the first sampled token."""

    def __init__(self, ids: TokenIds, device: torch.device) -> None:
        self.columns = torch.tensor(ids.blank, device=device)

    def apply(self, logits: Tensor, state: SlotState) -> None:
        rows = (state.blank & (state.n_gen == 0))[:, None]  # [B, 1]
        blank = logits.index_select(1, self.columns)
        logits.index_copy_(1, self.columns, blank.masked_fill(rows, NEG_INF))


class ForceLength(LogitPolicy):
    """Benchmarks: rows with `no_eot` never sample end-of-text."""

    def __init__(self, ids: TokenIds) -> None:
        self.eot = ids.eot

    def apply(self, logits: Tensor, state: SlotState) -> None:
        column = logits[:, self.eot]
        column.masked_fill_(state.no_eot, NEG_INF)


class TimestampRules(LogitPolicy):
    """Timestamps come in pairs (except right before end-of-text), never decrease, the first token is a
    timestamp no later than `max_initial`, and a timestamp is forced when timestamps are jointly more
    likely than any single text token. <|notimestamps|> is never sampled in timestamp mode."""

    def __init__(self, ids: TokenIds, device: torch.device) -> None:
        self.ts = ids.timestamp_begin
        self.eot = ids.eot
        self.no_timestamps = ids.no_timestamps
        self.ts_column = torch.arange(ids.timestamp_begin, ids.vocab, device=device)[None, :]  # [1, T]

    def apply(self, logits: Tensor, state: SlotState) -> None:
        # Each rule on the columns it concerns (a slice of the row, in place), not a [B, V] mask per rule: on a
        # CPU a step at one row took 0.9 ms here, most of a tiny.en step's filtering.
        ts, on = self.ts, state.ts_rules
        last_ts = (state.n_gen >= 1) & (state.tokens >= ts)
        penult_ts = (state.n_gen < 2) | (state.prev >= ts)
        closing = on & last_ts & ~penult_ts  # one timestamp: the pair is closed next, so no text
        first = on & (state.n_gen == 0)  # the first token is a timestamp, at most max_initial
        logits[:, : self.eot].masked_fill_(closing[:, None], NEG_INF)
        logits[:, :ts].masked_fill_(first[:, None], NEG_INF)
        floor = torch.where(closing, state.last_ts, state.last_ts + 1)  # timestamps never decrease
        stamps = (on & last_ts & penult_ts)[:, None]  # two timestamps in a row: now text
        stamps = stamps | ((on & (state.last_ts >= 0))[:, None] & (self.ts_column < floor[:, None]))
        stamps = stamps | (first[:, None] & (self.ts_column > state.max_initial[:, None]))
        logits[:, ts:].masked_fill_(stamps, NEG_INF)
        logits[:, self.no_timestamps].masked_fill_(on, NEG_INF)
        # a timestamp is forced where timestamps are jointly more likely than any text token
        logprobs = torch.log_softmax(logits, dim=-1)
        ts_mass = torch.logsumexp(logprobs[:, ts:], dim=-1)
        max_text = logprobs[:, :ts].max(dim=-1).values
        logits[:, :ts].masked_fill_((on & (ts_mass > max_text))[:, None], NEG_INF)


class Sampler:
    """Applies the policies, then picks each row's next token: argmax where temperature is 0, else a draw
    from softmax(logits / T) (Gumbel-max, graph-safe). Log-probabilities are of the filtered logits at
    temperature 1, as the reference reports them."""

    def __init__(self, ids: TokenIds, device: torch.device, *, fused_slots: int = 0) -> None:
        """fused_slots: run greedy, timestamp-free steps of up to that many rows as one Triton kernel
        (fused_sampling.py; CUDA with Triton only); 0: always the PyTorch policies below."""
        self.ids = ids
        self.base: list[LogitPolicy] = [SuppressBlank(ids, device), SuppressTokens(), ForceLength(ids)]
        self.timestamps = TimestampRules(ids, device)
        self.fused = (
            FusedGreedy(ids.eot, ids.timestamp_begin, ids.blank, fused_slots, device, INT_FIELDS, FLAG_FIELDS)
            if fused_slots
            else None
        )

    def step(
        self, logits: Tensor, state: SlotState, *, timestamps: bool, sampling: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Filter, sample and advance `state`: logits [B, V] float32 → (tokens [B], their log-probs [B],
        scores [B, V]), scores being the log-probs or the filtered logits (log_softmax gives the log-probs of
        either)."""
        if self.fused is not None and not timestamps and not sampling:
            tokens, chosen = self.fused(logits, state.ints, state.flags, state.suppress)
            return tokens, chosen, logits
        tokens, chosen, logprobs = self.sample(logits, state, timestamps=timestamps, sampling=sampling)
        self.advance(state, tokens)
        return tokens, chosen, logprobs

    def filter(self, logits: Tensor, state: SlotState, *, timestamps: bool) -> None:
        for policy in self.base:
            policy.apply(logits, state)
        if timestamps:
            self.timestamps.apply(logits, state)

    def sample(
        self, logits: Tensor, state: SlotState, *, timestamps: bool, sampling: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """logits [B, V] float32 → (tokens [B], their log-probs [B], log-probs [B, V]).

        `timestamps`/`sampling` say whether any row needs the timestamp rules or a random draw; when none
        does, those kernels are left out (the step is captured once per variant)."""
        self.filter(logits, state, timestamps=timestamps)
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1)
        if not sampling:
            return greedy, logprobs.gather(1, greedy[:, None])[:, 0], logprobs
        hot = state.temperature > 0
        temperature = torch.where(hot, state.temperature, torch.ones_like(state.temperature))
        noise = torch.empty_like(logits).exponential_().log_()  # -log(E) is Gumbel(0, 1)
        # argmax(logits / T + G) as argmax(logits + T·G): the same draw, but logits / T overflowed to +inf for a
        # tiny T (≤ 1e-37), and the first positive logit won
        drawn = (logits - noise * temperature[:, None]).argmax(dim=-1)
        tokens = torch.where(hot, drawn, greedy)
        return tokens, logprobs.gather(1, tokens[:, None])[:, 0], logprobs

    def advance(self, state: SlotState, sampled: Tensor) -> None:
        """Record the sampled tokens [B] in the active rows of `state` (a view over slots 0..B-1)."""
        active = state.active
        was = state.tokens.clone()
        state.prev.copy_(torch.where(active, was, state.prev))
        state.tokens.copy_(torch.where(active, sampled, was))
        state.positions.add_(active.long())
        state.n_gen.add_(active.long())
        is_ts = active & (sampled >= self.ids.timestamp_begin)
        state.last_ts.copy_(torch.where(is_ts, sampled, state.last_ts))
