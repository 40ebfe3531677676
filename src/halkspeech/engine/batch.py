"""The plain data that crosses the scheduler/runner seam (vLLM's `SchedulerOutput`/`ModelRunnerOutput`).

`Scheduler.schedule_*() -> Admission/DecodeStep`, `Runner.admit/step(...) -> AdmitOutput/StepOutput`,
`Scheduler.record_*(..., output)`. The scheduler never touches tensors; the runner never decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from halkspeech.engine.request import DecodeRequest


@dataclass(frozen=True)
class Admission:
    """A request entering the engine: encode its window, prefill its prompt in each of its slots."""

    rid: int
    request: DecodeRequest
    slots: tuple[int, ...]  # one per beam / sample; all share the window
    top_k: int  # > 0: report each slot's top-k tokens (beam search)


@dataclass(frozen=True)
class AlignJob:
    """A finished sequence's word-timing pass: its slot still holds the window's cross keys/values."""

    slot: int
    prompt: tuple[int, ...]  # the alignment prompt
    text: tuple[int, ...]  # the text tokens (no timestamps, no end-of-text)
    frames: int | None  # encoder positions of audio: reduce to the cost matrix on the device (None: scores)


@dataclass(frozen=True)
class AdmitResult:
    tokens: tuple[int, ...]  # first sampled token per slot
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]  # per slot, when top_k > 0
    no_speech_prob: float
    language_probs: dict[str, float] | None


@dataclass(frozen=True)
class SlotUpdate:
    """Overwrite a slot's state from another slot (beam reordering): self-attention cache up to
    `position`, and the host-computed filter state of the surviving sequence."""

    slot: int
    source: int
    token: int  # the next input token
    prev: int
    n_gen: int
    last_ts: int
    position: int


@dataclass(frozen=True)
class SlotMove:
    """Move a running sequence to a lower slot (compaction keeps the active range dense)."""

    source: int
    dest: int
    position: int


@dataclass(frozen=True)
class DecodeStep:
    """One decode step over slots 0..size-1."""

    size: int
    window: int  # self-attention keys read (≥ every active position + 1)
    active: tuple[int, ...]
    timestamps: bool  # some active slot applies the timestamp rules
    sampling: bool  # some active slot samples with a temperature
    top_k: int = 0
    top_slots: tuple[int, ...] = ()
    updates: tuple[SlotUpdate, ...] = ()
    moves: tuple[SlotMove, ...] = ()


@dataclass(frozen=True)
class StepOutput:
    tokens: tuple[int, ...]  # per slot 0..size-1 (idle slots' values are meaningless)
    logprobs: tuple[float, ...]
    top: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
