"""Which sequences run in the next step (pure Python, no tensors).

A request moves through three queues: waiting → encoding (its window is in an encoder run, which may start
before slots are free) → ready (encoded, waiting for slots). It enters the decoder when enough
slots are free (lowest slot numbers first, so the active range stays dense) and leaves the moment it
finishes. A decode step covers slots 0..size-1, where size is the smallest batch bucket holding every
active slot; when the active slots are scattered, the highest are moved down so idle slots are not computed.

The engine plans a step before the previous one's tokens are recorded (one step ahead: the device runs step
N+1 while the host records step N). A sequence's `pending` counts its steps planned and not yet recorded:
its next position counts them, and each step's plan remembers which sequence was in which slot, so a
sequence that ended meanwhile (end-of-text in step N, still computed in N+1) or a slot reassigned since
takes nothing from a later step's output.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from halkspeech.engine.batch import Admission, AdmitResult, DecodeStep, SlotMove, SlotUpdate, StepOutput
from halkspeech.engine.beam import BeamSearch, rank
from halkspeech.engine.request import Alignment, DecodeRequest, DecodeResult, FinishReason
from halkspeech.errors import InvalidRequest, Overloaded


@dataclass
class Sequence:
    slot: int
    tokens: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0
    done: bool = False
    pending: int = 0  # steps planned for it whose tokens are not recorded yet


@dataclass
class Group:
    """A request in flight: the slots it holds and what it has produced."""

    rid: int
    request: DecodeRequest
    submitted: float = field(default_factory=time.perf_counter)
    slots: list[int] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    prompt_len: int = 0
    max_new: int = 0
    no_speech_prob: float = float("nan")
    language_probs: dict[str, float] | None = None
    finish: FinishReason | None = None
    encoding: float = 0.0  # when its window's encoder run started (the end of its queue time)
    admitted: float = 0.0
    finished_at: float = 0.0
    encode_ms: float = 0.0
    alignment: Alignment | None = None

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.done]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)


class Scheduler:
    """Admission, step shapes and bookkeeping for a fixed number of decoder slots."""

    def __init__(
        self,
        slots: int,
        *,
        eot: int,
        timestamp_begin: int,
        n_text_ctx: int = 448,
        n_vocab: int | None = None,
        max_encoder_batch: int = 32,
        max_queue: int = 1024,
        batch_buckets: tuple[int, ...] | None = None,
        window_buckets: tuple[int, ...] | None = None,
        static: bool = False,
        padded: bool = False,
        admit_batch: int = 1,
        admit_wait_s: float = 0.0,
        lookahead: int | None = None,
        reserved_slots: int = 0,
    ) -> None:
        self.n_slots = slots
        #: Static batching (benchmark baseline): admit a new batch only when the last one has finished.
        self.static = static
        #: Textbook static batching (`static` and `padded`): the batch's rows all run until its longest member
        #: ends, finished ones too, as in a padded batch; plain `static` drops finished rows from the step.
        self.padded = static and padded
        self._batch_rows = 0  # padded: rows of the batch in flight
        #: While sequences decode, admit once `admit_batch` encoded windows can enter (enough are ready and
        #: enough slots are free) or some could for `admit_wait_s`: every admission (prefill) pauses all
        #: running sequences, so admitting one window per freed slot wastes the decode steps.
        self.admit_batch = max(1, min(admit_batch, slots // 2))  # never more than half the slots
        self.admit_wait_s = admit_wait_s
        #: Slots only priority (live) work may take: file requests filling every slot would make a live turn
        #: wait for one to free up.
        self.reserved_slots = min(reserved_slots, max(0, slots - 1))
        #: Windows encoded (or encoding) ahead of free slots at most.
        self.lookahead = lookahead if lookahead is not None else max(max_encoder_batch, slots // 2)
        self.eot = eot
        self.ts_begin = timestamp_begin
        self.n_text_ctx = n_text_ctx
        self.n_vocab = n_vocab
        self.max_encoder_batch = max_encoder_batch
        self.max_queue = max_queue
        self.batch_buckets = batch_buckets  # None: exact sizes (CPU, no graphs)
        self.window_buckets = window_buckets
        self._free = list(range(slots))
        self._waiting: list[tuple[int, int, Group]] = []  # heap of (priority, rid, group), not yet encoded
        self._encoding: dict[int, Group] = {}
        self._ready: list[tuple[int, int, Group]] = []  # heap: encoded, waiting for slots
        self._ready_since: float | None = None  # when some ready window first could have entered
        self._running: dict[int, Group] = {}
        self._live_running = 0  # priority (live) groups in _running: read every iteration, so counted
        self._lockstep_running = 0  # groups in _running that sample or search beams (see `lockstep`)
        self._ids = itertools.count()
        self._pending_updates: list[SlotUpdate] = []
        #: Tokens decode steps gave to sequences (a row computed for a sequence that ended meanwhile is not one).
        self.tokens_recorded = 0
        # planned steps not yet recorded, oldest first: (step, its (group, sequence, slot) rows)
        self._planned: deque[tuple[DecodeStep, tuple[tuple[Group, Sequence, int], ...]]] = deque()

    # --- queue -----------------------------------------------------------------------------------------
    def add(self, request: DecodeRequest) -> Group:
        if self.queue_depth >= self.max_queue:
            raise Overloaded(f"the decode queue is full ({self.max_queue} windows waiting)")
        size, limit = request.options.group_size, self.max_group_size(request.priority)
        if size > limit:  # it could never be admitted: not overload, retrying would not help
            raise InvalidRequest(f"{size} beams or samples need {size} decoder slots at once; this engine has {limit}")
        self._check_fits(request)
        group = Group(next(self._ids), request)
        heapq.heappush(self._waiting, (request.priority, group.rid, group))
        return group

    def _check_fits(self, request: DecodeRequest) -> None:
        """Refuse what the model cannot take before it joins a batch: admitted, it failed the step or the
        admission, and with it every other request running (a prompt of 461 tokens in a 448-token context, a
        suppressed token past the vocabulary)."""
        if len(request.prompt) > self.n_text_ctx:
            raise InvalidRequest(
                f"the prompt has {len(request.prompt)} tokens; the model's text context holds {self.n_text_ctx}"
            )
        if self.n_vocab is not None:
            tokens = (*request.prompt, *request.options.suppress_tokens, *(request.alignment_prompt or ()))
            if tokens and not 0 <= min(tokens) <= max(tokens) < self.n_vocab:
                raise InvalidRequest(f"a token of the request is outside the vocabulary (0..{self.n_vocab - 1})")

    def max_group_size(self, priority: int = 0) -> int:
        """The most slots one request may take: all of them for live turns (priority < 0), less the reserve
        kept for live turns otherwise."""
        return self.n_slots - (0 if priority < 0 else self.reserved_slots)

    def cancel(self, group: Group) -> bool:
        """Drop a queued group or stop a running one at once (its slots are free when this returns).

        Call between steps only (the engine thread does). Returns False if it had already finished."""
        if group.finish is not None:
            return False
        for heap in (self._waiting, self._ready):
            for i, (_, _, queued) in enumerate(heap):
                if queued is group:
                    heap.pop(i)
                    heapq.heapify(heap)
                    group.finish = "cancelled"
                    return True
        if group.rid in self._encoding:  # its encoder run finishes anyway; mark_encoded then drops it
            group.finish = "cancelled"
            return True
        if group.rid in self._running:
            self.abort(group)
            return True
        return False

    @property
    def queue_depth(self) -> int:
        """Windows accepted but not yet decoding."""
        return len(self._waiting) + len(self._encoding) + len(self._ready)

    @property
    def running(self) -> int:
        """Sequences decoding (a count over every group: for metrics, not for the engine's loop). Other threads
        read it while the engine thread admits and finishes groups, so the groups are copied first: one C call,
        which no thread switch can split, where iterating the dict raised "dictionary changed size during
        iteration" (a 500 under load, in Replicas.take)."""
        groups = list(self._running.values())
        return sum(len(g.live) for g in groups)

    @property
    def decoding(self) -> bool:
        """Some sequence is decoding (a finished group leaves at once, so a running group has a live one)."""
        return bool(self._running)

    def clear(self) -> list[Group]:
        """Forget every group (the engine has stopped): the queue and the running count go back to 0. Returns
        the groups that were queued, encoding, ready or running."""
        groups = [g for *_, g in self._waiting] + list(self._encoding.values()) + [g for *_, g in self._ready]
        groups += list(self._running.values())
        self._waiting, self._ready, self._encoding, self._running = [], [], {}, {}
        self._planned.clear()
        self._pending_updates = []
        self._free = list(range(self.n_slots))
        self._live_running = self._lockstep_running = 0
        self._batch_rows = 0
        return groups

    def running_group(self, rid: int) -> Group:
        """The running group of an admission (`Admission.rid`)."""
        return self._running[rid]

    def running_groups(self) -> list[Group]:
        return list(self._running.values())

    def abort(self, group: Group) -> Group:
        """Stop a running group at once (a failed step): mark it cancelled and free its slots."""
        group.finish = "cancelled"
        return self._finish(group)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._encoding or self._ready or self._running)

    @property
    def lockstep(self) -> bool:
        """Some running group samples (temperature > 0) or searches beams: each step must be recorded before the
        next is planned. Beams reorder their slots from each step's results; sampling draws from one random
        stream, and a step planned ahead would draw for sequences that had ended, so every later sample (and a
        temperature fallback's outcome) would differ from decoding one step at a time."""
        return self._lockstep_running > 0

    @property
    def live_decoding(self) -> bool:
        """Some priority (live) sequence is decoding now."""
        return self._live_running > 0

    def file_work_held(self, hold_s: float) -> bool:
        """Hold back encoding file (non-priority) windows while live turns decode, for at most `hold_s`
        of waiting: an encoder run between two decode steps of a live turn adds its whole length."""
        if not self._waiting or self._waiting[0][0] < 0 or not self.live_decoding:
            return False
        return time.perf_counter() - self._waiting[0][2].submitted < hold_s

    @property
    def waiting(self) -> int:
        """Windows not yet encoded."""
        return len(self._waiting)

    def waited(self, seconds: float) -> bool:
        """The next window to encode is live (priority) work or has waited `seconds` (none waits: False)."""
        if not self._waiting:
            return False
        priority, _, group = self._waiting[0]
        return priority < 0 or time.perf_counter() - group.submitted >= seconds

    def is_encoding(self, group: Group) -> bool:
        return group.rid in self._encoding

    # --- encoding ahead ------------------------------------------------------------------------------------
    def schedule_encode(self, limit: int) -> list[Group]:
        """Waiting groups whose windows to encode next: at most `limit`, and no more than `lookahead`
        windows encoded ahead of the free slots (static batching: a whole batch, when nothing runs)."""
        if self.static:
            if self._running or self._encoding:
                return []
            budget = min(self.n_slots - len(self._ready), len(self._waiting))
        else:
            budget = min(limit, self.lookahead + len(self._free) - len(self._ready) - len(self._encoding))
            if self._running and budget < min(limit, len(self._waiting)):
                # While sequences decode, only whole runs: topping the look-ahead up as each slot frees made
                # runs of 1-2 windows (H100, mixed workload: 272 runs for 512 windows, 1.7× the encoder time
                # of runs of 64); a window costs about the same from 16 windows a run up.
                budget = 0
        chosen: list[Group] = []
        live = bool(self._waiting) and self._waiting[0][0] < 0
        while self._waiting and len(chosen) < max(budget, 1 if live else 0):
            if live and self._waiting[0][0] >= 0:
                break  # live windows run on their own: never behind file windows in one encoder run
            _, _, group = heapq.heappop(self._waiting)
            group.encoding = time.perf_counter()
            self._encoding[group.rid] = group
            chosen.append(group)
        return chosen

    def drop_encoding(self, group: Group) -> None:
        """Its encoder run failed: it leaves the engine (the caller fails its request)."""
        self._encoding.pop(group.rid, None)
        group.finish = "cancelled"

    def mark_encoded(self, groups: list[Group]) -> list[Group]:
        """Their windows are encoded: ready to enter. Returns the ones cancelled meanwhile (to complete)."""
        dropped = []
        for group in groups:
            self._encoding.pop(group.rid, None)
            if group.finish is None:
                heapq.heappush(self._ready, (group.request.priority, group.rid, group))
            else:
                dropped.append(group)
        return dropped

    # --- admission -------------------------------------------------------------------------------------
    def schedule_admission(self, fresh: int = 0) -> list[Admission]:
        """Encoded groups that enter the decoder now (their slots are assigned). `fresh`: windows of an encoder
        run queued just now on the stream the admission uses (see `_admit_now`)."""
        if not self._ready or not self._free:
            return []
        if self.static:  # the batch is whatever was encoded while the last one ran: no waiting to fill it
            if self._running or self._encoding:
                return []
        elif self._running and not self._admit_now(fresh):
            return []
        self._ready_since = None
        admissions: list[Admission] = []
        while self._ready:
            priority, _, group = self._ready[0]
            size = group.request.options.group_size
            if size > len(self._free) - (0 if priority < 0 else self.reserved_slots):
                break
            heapq.heappop(self._ready)
            group.slots = [heapq.heappop(self._free) for _ in range(size)]
            group.admitted = time.perf_counter()
            # its sequences exist from now, their first token pending: a step planned before the admission is
            # recorded (the engine reads it one step late) continues them from the prompt's end
            group.prompt_len = len(group.request.prompt)  # a detected language is written in place
            group.max_new = min(group.request.options.max_new_tokens, self.n_text_ctx + 1 - group.prompt_len)
            group.seqs = [Sequence(slot, pending=1) for slot in group.slots]
            self._running[group.rid] = group
            self._live_running += priority < 0
            self._lockstep_running += _lockstep(group)
            options = group.request.options
            top_k = options.beam_size + 1 if options.beam_size > 1 else 0
            admissions.append(Admission(group.rid, group.request, tuple(group.slots), top_k))
        if self.padded and admissions:
            self._batch_rows = max(s for g in self._running.values() for s in g.slots) + 1
        return admissions

    def _admit_now(self, fresh: int) -> bool:
        """While sequences decode: enter once admit_batch windows can, or when some could for admit_wait_s.

        A run of `fresh` windows just queued on the decode stream enters at once when all of it can (or
        admit_batch of it): its admission is launched while the encoder runs, and runs right after it. Held
        back for the timer, the admission was launched later, after the engine thread had waited for a step
        queued behind the run, onto an idle GPU (H200 server timeline: 24% of the device's idle time)."""
        if self._ready[0][0] < 0:  # live (priority) work never waits
            return True
        can_enter = min(len(self._ready), len(self._free))
        if can_enter >= self.admit_batch or (not self._waiting and not self._encoding):
            return True
        if fresh and can_enter >= min(fresh, self.admit_batch):
            return True
        if len(self._ready) >= self.admit_batch:
            # Enough windows wait; slots are what is short. Wait for admit_batch of them: an idle slot costs a
            # step little (its cost follows the sequences it reads), an admission costs 10-30 ms of eager
            # prefill. (With the timer here, large-v3 on the mixed workload admitted 2 windows at a time.)
            return False
        now = time.perf_counter()
        if self._ready_since is None:
            self._ready_since = now
        return now - self._ready_since >= self.admit_wait_s

    def record_admission(self, admission: Admission, result: AdmitResult, encode_ms: float) -> Group | None:
        """Take the first tokens of a newly admitted group; returns it if it already finished. (A group
        cancelled since its admission was launched has left already: nothing to take.)"""
        group = self._running.get(admission.rid)
        if group is None:
            return None
        options = group.request.options
        group.encode_ms = encode_ms
        group.no_speech_prob = result.no_speech_prob
        group.language_probs = result.language_probs
        for seq in group.seqs:
            seq.pending -= 1
        if group.max_new <= 0:  # no token wanted (the reference's loop runs zero times): the first one is dropped
            group.finish = "detected" if group.request.detect_language else "length"
            return self._finish(group)
        if options.beam_size > 1:
            group.beam = BeamSearch(options.beam_size, self.eot, options.patience)
            self._beam_step(group, [result.top[i] for i in range(len(group.slots))])
        else:
            for seq, token, logprob in zip(group.seqs, result.tokens, result.logprobs, strict=True):
                self._append(group, seq, token, logprob)
        return self._finish(group) if group.done else None

    # --- decoding --------------------------------------------------------------------------------------
    def schedule_decode(self) -> DecodeStep | None:
        """The next decode step over the running sequences, or None when nothing decodes.

        One pass over the groups: this runs on the engine thread between GPU steps and adds to their time
        (with the comprehensions it replaced, the bookkeeping per step at 56 sequences was 0.37 ms, now 0.13:
        bench/engine_host.py)."""
        moves = self._compact()
        slots: list[int] = []
        rows: list[tuple[Group, Sequence, int]] = []
        top_slots: list[int] = []
        last_position, top_k = 0, 0
        timestamps = sampling = False
        for group in self._running.values():
            before = len(slots)
            max_new, last_input = group.max_new, group.prompt_len - 1
            for seq in group.seqs:
                have = len(seq.tokens) + seq.pending  # recorded and planned
                if not seq.done and have < max_new:  # not already given its last token by a planned step
                    seq.pending += 1
                    slots.append(seq.slot)
                    rows.append((group, seq, seq.slot))
                    if last_input + have > last_position:  # the position this step reads the sequence at
                        last_position = last_input + have
            if len(slots) == before:
                continue
            options = group.request.options
            timestamps = timestamps or options.timestamps
            sampling = sampling or options.temperature > 0
            if group.beam is not None:
                top_slots.extend(slots[before:])
                top_k = max(top_k, options.beam_size + 1)
        if not slots:
            return None
        slots.sort()
        updates, self._pending_updates = tuple(self._pending_updates), []
        step = DecodeStep(
            size=self._bucket(max(slots[-1] + 1, self._batch_rows), self.batch_buckets),
            window=self._bucket(last_position + 1, self.window_buckets),
            active=tuple(slots),
            timestamps=timestamps,
            sampling=sampling,
            top_k=top_k,
            top_slots=tuple(sorted(top_slots)),
            updates=updates,
            moves=moves,
        )
        self._planned.append((step, tuple(rows)))
        return step

    def record_step(self, step: DecodeStep, output: StepOutput) -> list[Group]:
        """Append each planned sequence's token (steps are recorded in the order they were planned); returns
        the groups that finished."""
        planned, rows = self._planned.popleft()
        assert planned is step, "steps are recorded in the order they were planned"
        tokens, logprobs = output.tokens, output.logprobs
        live: dict[int, tuple[Group, bool]] = {}  # rid → (group, some sequence of it still decodes)
        for group, seq, slot in rows:
            seq.pending -= 1
            if group.finish is not None or seq.done:
                continue  # ended by an earlier step, or cancelled, since this step was planned
            self.tokens_recorded += 1
            if group.beam is None:
                self._append(group, seq, tokens[slot], logprobs[slot])
                before = live.get(group.rid)
                live[group.rid] = (group, (before is not None and before[1]) or not seq.done)
            else:
                live[group.rid] = (group, True)
        finished: list[Group] = []
        for group, decoding in live.values():
            if group.beam is not None:  # never planned ahead: its slots are as planned
                self._beam_step(group, [output.top[s.slot] for s in group.seqs])
                decoding = not group.done
            if not decoding:
                finished.append(self._finish(group))
        return finished

    def discard_plans(self) -> None:
        """Forget planned steps that will not be recorded (a step failed)."""
        for _, rows in self._planned:
            for _, seq, _ in rows:
                seq.pending -= 1
        self._planned.clear()

    # --- internals -------------------------------------------------------------------------------------
    def _append(self, group: Group, seq: Sequence, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        seq.sum_logprob += logprob
        forced = group.request.options.force_length
        if (token == self.eot and not forced) or len(seq.tokens) >= group.max_new:
            seq.done = True

    def _beam_step(self, group: Group, top: list[tuple[tuple[int, ...], tuple[float, ...]]]) -> None:
        beam = group.beam
        assert beam is not None
        beam.step([list(t) for t, _ in top], [list(lp) for _, lp in top])
        steps = len(beam.beams[0].tokens) if beam.beams else group.max_new
        if beam.done or steps >= group.max_new or not beam.beams:
            for seq in group.seqs:
                seq.done = True
            return
        for seq, survivor in zip(group.seqs, beam.beams, strict=True):
            seq.tokens = list(survivor.tokens)
            seq.sum_logprob = survivor.sum_logprob
            timestamps = [t for t in survivor.tokens if t >= self.ts_begin]
            self._pending_updates.append(
                SlotUpdate(
                    slot=seq.slot,
                    source=group.slots[survivor.source],
                    token=survivor.tokens[-1],
                    prev=survivor.tokens[-2] if len(survivor.tokens) > 1 else -1,
                    n_gen=len(survivor.tokens),
                    last_ts=timestamps[-1] if timestamps else -1,
                    position=group.prompt_len + len(survivor.tokens) - 1,
                )
            )

    def _finish(self, group: Group) -> Group:
        if self._running.pop(group.rid, None) is not None:
            self._live_running -= group.request.priority < 0
            self._lockstep_running -= _lockstep(group)
        if group.finish is None:
            group.finish = self._reason(group)
        group.finished_at = time.perf_counter()
        if not self.needs_alignment(group):  # else its cross keys/values stay until release_held
            for slot in group.slots:
                heapq.heappush(self._free, slot)
        # a beam group stopped early must not leave reorders behind for slots that get reassigned
        self._pending_updates = [u for u in self._pending_updates if u.slot not in group.slots]
        return group

    @staticmethod
    def needs_alignment(group: Group) -> bool:
        """A finished group whose word-timing pass is still to run (its slots are held for it)."""
        return group.request.alignment_prompt is not None and group.finish not in (None, "cancelled")

    def release_held(self, group: Group) -> None:
        """The word-timing pass of a finished group ran: its slots are free."""
        for slot in group.slots:
            heapq.heappush(self._free, slot)

    @property
    def starved(self) -> bool:
        """Encoded windows wait and no slot is free: held slots should be released now."""
        return bool(self._ready) and not self._free

    def _reason(self, group: Group) -> FinishReason:
        if group.beam is not None:
            return "eot" if group.beam.finished else "length"
        ended = all(s.tokens and s.tokens[-1] == self.eot for s in group.seqs)
        return "eot" if ended else "length"

    def result(self, group: Group, decode_ms: float) -> DecodeResult:
        """The group's chosen sequence as a DecodeResult (call after it finished)."""
        options = group.request.options
        if group.beam is not None:
            tokens, logprob = group.beam.best(options.length_penalty)
        elif group.seqs:
            candidates = [(self._strip(s.tokens), s.sum_logprob) for s in group.seqs]
            tokens, logprob = candidates[rank(candidates, options.length_penalty)]
        else:
            tokens, logprob = (), 0.0
        queue_ms = (group.encoding - group.submitted) * 1000 if group.encoding else 0.0
        return DecodeResult(
            tokens=tuple(tokens),
            sum_logprob=logprob,
            avg_logprob=logprob / (len(tokens) + 1),
            no_speech_prob=group.no_speech_prob,
            temperature=options.temperature,
            finish_reason=group.finish or "length",
            language_probs=group.language_probs,
            queue_ms=queue_ms,
            encode_ms=group.encode_ms,
            decode_ms=decode_ms,
        )

    def _strip(self, tokens: list[int]) -> tuple[int, ...]:
        return tuple(tokens[:-1]) if tokens and tokens[-1] == self.eot else tuple(tokens)

    def _compact(self) -> tuple[SlotMove, ...]:
        """Move the highest active single-slot sequences into lower free slots while that shrinks the step."""
        if self.batch_buckets is None or not self._free or self.padded:
            return ()
        moves: list[SlotMove] = []
        # highest slot first; a moved sequence takes the lowest free slot, so none is left below it to move to
        singles = sorted(
            ((s.slot, g, s) for g in self._running.values() if g.beam is None for s in g.seqs if not s.done),
            key=lambda entry: entry[0],
            reverse=True,
        )
        occupied = self._bucket(sum(len(g.slots) for g in self._running.values()), self.batch_buckets)
        for _, group, seq in singles:
            lowest = self._free[0]
            if lowest > seq.slot or self._bucket(seq.slot + 1, self.batch_buckets) <= occupied:
                break
            heapq.heappop(self._free)
            moves.append(SlotMove(seq.slot, lowest, group.prompt_len + len(seq.tokens) + seq.pending - 1))
            group.slots[group.slots.index(seq.slot)] = lowest
            heapq.heappush(self._free, seq.slot)
            seq.slot = lowest
        return tuple(moves)

    @staticmethod
    def _bucket(value: int, buckets: tuple[int, ...] | None) -> int:
        if buckets is None:
            return value
        i = bisect.bisect_left(buckets, value)
        return buckets[min(i, len(buckets) - 1)]


def _lockstep(group: Group) -> bool:
    options = group.request.options
    return options.temperature > 0 or options.beam_size > 1
