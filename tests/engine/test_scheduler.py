"""The scheduler alone (no model): admission, slot allocation, compaction, finishing, cancellation."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from halkspeech.engine.batch import Admission, AdmitResult, DecodeStep, StepOutput
from halkspeech.engine.beam import BeamSearch, rank
from halkspeech.engine.request import DecodeRequest, SamplingOptions
from halkspeech.engine.scheduler import Group, Scheduler
from halkspeech.errors import InvalidRequest, Overloaded

EOT, TS = 50256, 50363
FEATURES = torch.zeros(80, 3000)


def request(max_new: int = 10, *, beam: int = 1, priority: int = 0) -> DecodeRequest:
    options = SamplingOptions(max_new_tokens=max_new, beam_size=beam, timestamps=False)
    return DecodeRequest(FEATURES, (50257, 50362), 0, options, priority=priority)


def admit_all(s: Scheduler, first_token: int = 5) -> list[int]:
    """Encode what may be encoded, admit what fits; every slot's first token is `first_token`.
    Returns the admitted groups' rids."""
    s.mark_encoded(s.schedule_encode(limit=1000))
    return record(s, s.schedule_admission(), first_token)


def record(s: Scheduler, admitted: list[Admission], first_token: int = 5) -> list[int]:
    for a in admitted:
        result = AdmitResult(
            tokens=(first_token,) * len(a.slots),
            logprobs=(-0.1,) * len(a.slots),
            top=tuple(((first_token, 6, EOT), (-0.1, -1.0, -2.0)) for _ in a.slots),
            no_speech_prob=0.0,
            language_probs=None,
        )
        s.record_admission(a, result, encode_ms=1.0)
    return [a.rid for a in admitted]


def step(s: Scheduler, token_of: dict[int, int] | None = None, default: int = 7) -> list[int]:
    """One decode step where slot i samples token_of.get(i, default); returns the finished rids."""
    plan = s.schedule_decode()
    assert plan is not None
    tokens = tuple((token_of or {}).get(i, default) for i in range(plan.size))
    top = {slot: ((default, 8, EOT), (-0.1, -2.0, -3.0)) for slot in plan.top_slots}
    return [g.rid for g in s.record_step(plan, StepOutput(tokens, (-0.5,) * plan.size, top))]


def scheduler(slots: int = 4, **kwargs: object) -> Scheduler:
    return Scheduler(slots, eot=EOT, timestamp_begin=TS, **kwargs)  # type: ignore[arg-type]


def test_admits_what_fits_lowest_slots_first() -> None:
    s = scheduler(slots=3)
    for _ in range(5):
        s.add(request())
    assert admit_all(s) == [0, 1, 2]
    plan = s.schedule_decode()
    assert plan is not None and plan.active == (0, 1, 2) and plan.size == 3
    assert s.queue_depth == 2


def test_a_finished_sequence_frees_its_slot_at_once() -> None:
    s = scheduler(slots=2)
    for _ in range(3):
        s.add(request())
    admit_all(s)
    finished = step(s, {0: EOT})
    assert finished == [0]
    assert admit_all(s) == [2]  # the third request takes slot 0 at the next boundary
    plan = s.schedule_decode()
    assert plan is not None and plan.active == (0, 1)


def test_max_new_tokens_and_forced_length() -> None:
    s = scheduler(slots=2)
    s.add(request(max_new=3))
    forced = DecodeRequest(FEATURES, (1, 2), 0, SamplingOptions(max_new_tokens=3, force_length=True))
    s.add(forced)
    admit_all(s, first_token=EOT)  # the forced one must not stop at end-of-text
    assert s.running == 1
    assert step(s, default=EOT) == []
    assert step(s, default=EOT) == [1]


def test_a_step_planned_ahead_gives_nothing_to_a_sequence_that_ended_or_to_its_slot_s_next_owner() -> None:
    # The engine plans step N+1 before it records step N (the device runs one while the host records the other).
    s = scheduler(slots=2)
    groups = [s.add(request(max_new=10)) for _ in range(3)]
    admit_all(s)  # groups 0 and 1 in slots 0 and 1, first token 5 each
    first = s.schedule_decode()
    second = s.schedule_decode()
    assert first is not None and second is not None
    assert second.active == (0, 1) and (first.window, second.window) == (3, 4)  # prompt of 2: positions 2, 3
    assert [g.rid for g in s.record_step(first, StepOutput((EOT, 7), (-0.5, -0.5)))] == [0]
    assert admit_all(s) == [2]  # group 2 takes slot 0 while `second` (which computed group 0 there) runs
    assert s.record_step(second, StepOutput((9, 8), (-0.5, -0.5))) == []
    assert [g.seqs[0].tokens for g in groups] == [[5, EOT], [5, 7, 8], [5]]
    third = s.schedule_decode()
    assert third is not None and third.window == 5  # group 1's third token is read at position 4
    assert all(seq.pending == 1 for g in groups[1:] for seq in g.seqs)


def test_a_sequence_moved_while_a_step_is_in_flight_is_read_where_each_step_computed_it() -> None:
    s = scheduler(slots=16, batch_buckets=(1, 2, 4, 8, 16))
    groups = [s.add(request(max_new=50)) for _ in range(9)]
    admit_all(s)  # slots 0..8, first token 5
    first, second = s.schedule_decode(), s.schedule_decode()
    assert first is not None and second is not None
    ended = {slot: EOT for slot in range(8)}
    assert len(s.record_step(first, StepOutput(tuple(ended.get(i, 7) for i in range(16)), (-0.5,) * 16))) == 8
    third = s.schedule_decode()  # `second` still runs: the last sequence moves down with its pending token
    assert third is not None and third.size == 1
    # its KV cache up to the position `second` wrote (prompt 2 + tokens [5, 7] + 1 pending - 1) moves with it
    assert [(m.source, m.dest, m.position) for m in third.moves] == [(8, 0, 4)]
    s.record_step(second, StepOutput(tuple(8 if i == 8 else 0 for i in range(16)), (-0.5,) * 16))
    s.record_step(third, StepOutput((9,), (-0.5,)))
    assert groups[8].seqs[0].tokens == [5, 7, 8, 9] and groups[8].seqs[0].slot == 0


def test_lockstep_while_a_group_samples_or_searches_beams() -> None:
    s = scheduler(slots=8)
    s.add(request(max_new=3))
    sampled = DecodeRequest(FEATURES, (50257, 50362), 0, SamplingOptions(max_new_tokens=3, temperature=0.5))
    s.add(sampled)
    admit_all(s)
    assert s.lockstep  # a step planned ahead would draw random numbers for rows that had ended
    while s.running:
        step(s)
    assert not s.lockstep
    s.add(request(max_new=3, beam=2))
    admit_all(s)
    assert s.lockstep


def test_no_step_is_planned_past_a_sequence_s_last_token() -> None:
    s = scheduler(slots=1)
    group = s.add(request(max_new=2))
    admit_all(s)  # its first token; one more to go
    first = s.schedule_decode()
    assert first is not None and s.schedule_decode() is None  # the planned step gives it its last token
    assert [g.rid for g in s.record_step(first, StepOutput((7,), (-0.5,)))] == [group.rid]
    assert group.seqs[0].tokens == [5, 7] and group.finish == "length"


def test_priority_requests_jump_the_queue() -> None:
    s = scheduler(slots=1)
    for _ in range(3):
        s.add(request())
    s.add(request(priority=-1))
    assert admit_all(s) == [3]


def test_queue_limit_raises_overloaded() -> None:
    s = scheduler(slots=1, max_queue=2)
    s.add(request())
    s.add(request())
    with pytest.raises(Overloaded):
        s.add(request())


def test_a_group_wider_than_it_may_ever_get_is_refused_not_queued() -> None:
    """File work may take all slots but the live reserve: 4 beams fit 5 slots with 1 reserved, 5 do not (they
    would wait forever); a live turn may use the reserve. Permanent, so not Overloaded (a 429 to retry)."""
    s = scheduler(slots=5, reserved_slots=1)
    assert s.max_group_size() == 4 and s.max_group_size(priority=-1) == 5
    with pytest.raises(InvalidRequest, match="5 beams or samples need 5 decoder slots at once; this engine has 4"):
        s.add(request(beam=5))
    s.add(request(beam=5, priority=-1))
    s.add(request(beam=4))
    s.mark_encoded(s.schedule_encode(limit=1000))
    assert [a.slots for a in s.schedule_admission()] == [(0, 1, 2, 3, 4)]  # the live group; the other waits


def test_cancel_waiting_and_running() -> None:
    s = scheduler(slots=1)
    running = s.add(request(max_new=100))
    waiting = s.add(request())
    admit_all(s)
    assert s.cancel(waiting) and s.queue_depth == 0
    assert s.cancel(running)  # stopped at once, between steps: its slot is free again
    assert not s.has_work and s.schedule_decode() is None
    assert not s.cancel(running)  # a second cancel is a no-op


def test_compaction_moves_high_slots_down() -> None:
    s = scheduler(slots=16, batch_buckets=(1, 2, 4, 8, 16))
    for _ in range(9):
        s.add(request(max_new=50))
    admit_all(s)  # slots 0..8 → bucket 16
    tokens = dict.fromkeys(range(8), EOT)  # everything but slot 8 ends
    step(s, tokens)
    plan = s.schedule_decode()
    assert plan is not None
    assert [(m.source, m.dest) for m in plan.moves] == [(8, 0)]
    assert plan.active == (0,) and plan.size == 1


def test_static_batching_takes_what_arrived_meanwhile() -> None:
    s = scheduler(slots=4, static=True)
    s.add(request(max_new=5))
    encoding = s.schedule_encode(limit=10)
    for _ in range(3):  # more arrive while the first is encoded: they wait for the next batch
        s.add(request(max_new=5))
    s.mark_encoded(encoding)
    assert record(s, s.schedule_admission()) == [0]
    step(s, {0: EOT})
    s.mark_encoded(s.schedule_encode(limit=10))
    assert len(s.schedule_admission()) == 3


def test_static_batching_waits_for_the_whole_batch() -> None:
    s = scheduler(slots=2, static=True)
    for _ in range(4):
        s.add(request(max_new=5))
    admit_all(s)
    step(s, {0: EOT})
    assert s.schedule_encode(limit=10) == []  # slot 0 is free, but the batch is not over
    step(s, {1: EOT})
    s.mark_encoded(s.schedule_encode(limit=10))
    assert len(s.schedule_admission()) == 2


def test_admission_waits_for_enough_free_slots() -> None:
    s = scheduler(slots=4, admit_batch=2, admit_wait_s=60.0, lookahead=2)
    for _ in range(8):
        s.add(request(max_new=50))
    assert admit_all(s) == [0, 1, 2, 3]
    s.mark_encoded(s.schedule_encode(limit=10))  # two more are encoded ahead; two still wait
    step(s, {0: EOT})
    assert s.schedule_admission() == []  # one slot free while the rest decode: wait for a second
    step(s, {1: EOT})
    assert [a.slots for a in s.schedule_admission()] == [(0,), (1,)]


def test_encoding_ahead_is_bounded() -> None:
    s = scheduler(slots=4, lookahead=2)
    for _ in range(20):
        s.add(request(max_new=50))
    assert len(s.schedule_encode(limit=100)) == 6  # the four free slots plus two ahead
    assert s.schedule_encode(limit=100) == []
    assert s.queue_depth == 20


def test_a_window_cancelled_while_encoding_is_handed_back() -> None:
    s = scheduler(slots=2)
    group = s.add(request())
    encoding = s.schedule_encode(limit=4)
    assert s.cancel(group) and s.is_encoding(group)
    assert s.mark_encoded(encoding) == [group]
    assert s.schedule_admission() == [] and not s.has_work


def test_beam_group_reorders_slots() -> None:
    s = scheduler(slots=4)
    s.add(request(max_new=4, beam=2))
    admit_all(s)
    plan = s.schedule_decode()
    assert plan is not None and plan.top_slots == (0, 1) and plan.top_k == 3
    assert {u.slot for u in plan.updates} == {0, 1}


def test_beam_search_matches_reference_bookkeeping() -> None:
    beam = BeamSearch(beam_size=2, eot=EOT, patience=1.0)
    # first step: identical beams, candidates dedupe
    assert not beam.step([[1, 2, EOT], [1, 2, EOT]], [[-0.1, -0.5, -3.0], [-0.1, -0.5, -3.0]])
    assert [b.tokens for b in beam.beams] == [(1,), (2,)]
    # second step: the best candidate ends, the rest continue
    done = beam.step([[EOT, 3, 4], [5, EOT, 6]], [[-0.1, -2.0, -2.5], [-0.3, -0.4, -5.0]])
    assert (1, EOT) in beam.finished and (2, EOT) in beam.finished and done
    tokens, logprob = beam.best(None)
    assert tokens == (1,) and logprob == pytest.approx(-0.2)


def test_rank_uses_length_normalisation() -> None:
    candidates = [((1, 2, 3, 4), -2.0), ((1,), -1.0)]
    assert rank(candidates, None) == 0  # -0.5 per token beats -1.0
    assert rank(candidates, 1.0) == 1  # Google NMT: ((5 + 4) / 6) ** 1 = 1.5, so -2 / 1.5 < -1


def test_live_work_gets_reserved_slots_and_its_own_encoder_run() -> None:
    s = scheduler(slots=4, reserved_slots=1)
    for _ in range(6):
        s.add(request(max_new=50))
    assert admit_all(s) == [0, 1, 2]  # file work leaves the reserved slot free
    s.add(request(priority=-1))
    encoding = s.schedule_encode(limit=16)
    assert [g.request.priority for g in encoding] == [-1]  # not batched with the waiting file windows
    s.mark_encoded(encoding)
    assert [a.slots for a in record_and_return(s)] == [(3,)]


def record_and_return(s: Scheduler) -> list[Admission]:
    admitted = s.schedule_admission()
    record(s, admitted)
    return admitted


def test_file_encoding_waits_briefly_while_live_turns_decode() -> None:
    s = scheduler(slots=4)
    s.add(request(max_new=50, priority=-1))
    admit_all(s)  # a live turn is decoding
    s.add(request())
    assert s.file_work_held(hold_s=60.0)
    assert not s.file_work_held(hold_s=0.0)  # never longer than the hold
    s.add(request(priority=-1))
    assert not s.file_work_held(hold_s=60.0)  # live windows are never held


def test_waited_says_whether_the_next_window_waited_long_enough() -> None:
    s = scheduler(slots=4)
    assert not s.waited(0.0)  # nothing waits
    s.add(request())
    assert s.waited(0.0) and not s.waited(60.0)
    s.add(request(priority=-1))
    assert s.waited(60.0)  # a live window never waits for company


def test_encoder_runs_stay_whole_while_decoding() -> None:
    # topping the look-ahead up one freed slot at a time made encoder runs of one window
    s = scheduler(slots=8, lookahead=4)
    for _ in range(40):
        s.add(request(max_new=50))
    admit_all(s)
    runs = []
    for slot in range(8):
        step(s, {slot: EOT})
        record(s, s.schedule_admission())
        encoding = s.schedule_encode(limit=4)
        if encoding:
            runs.append(len(encoding))
            s.mark_encoded(encoding)
    assert runs and all(n == 4 for n in runs)


def test_a_finished_window_awaiting_word_timing_keeps_its_slot() -> None:
    s = scheduler(slots=1)
    timed = DecodeRequest(FEATURES, (50257, 50362), 0, SamplingOptions(max_new_tokens=5, timestamps=False),
                          alignment_prompt=(50257, 50362))  # fmt: skip
    first = s.add(timed)
    s.add(request())
    admit_all(s)
    assert step(s, {0: EOT}) == [first.rid]
    assert s.needs_alignment(first)
    s.mark_encoded(s.schedule_encode(limit=4))
    assert s.schedule_admission() == [] and s.starved  # the only slot is held: it keeps the window's keys/values
    s.release_held(first)
    assert [a.slots for a in s.schedule_admission()] == [(0,)]


def test_with_windows_ready_admission_waits_for_enough_slots_not_the_timer() -> None:
    # many windows ready, slots short: an admission of one window per freed slot costs a prefill each
    s = scheduler(slots=4, admit_batch=2, admit_wait_s=0.0, lookahead=4)
    for _ in range(12):
        s.add(request(max_new=50))
    admit_all(s)
    s.mark_encoded(s.schedule_encode(limit=10))
    step(s, {0: EOT})
    assert s.schedule_admission() == []  # the timer (0 s) has run out, but two slots are wanted
    step(s, {1: EOT})
    assert [a.slots for a in s.schedule_admission()] == [(0,), (1,)]


def test_a_run_just_queued_on_the_decode_stream_enters_at_once() -> None:
    # fewer windows than admit_batch, the timer far off: a fresh inline run still enters (its admission is
    # launched while the encoder runs); the same windows without `fresh` wait for the timer
    s = scheduler(slots=8, admit_batch=4, admit_wait_s=60.0, lookahead=8)
    for _ in range(10):  # more wait behind them, so the scheduler does not admit because nothing else will come
        s.add(request(max_new=50))
    s.mark_encoded(s.schedule_encode(limit=4))
    record(s, s.schedule_admission())  # nothing decodes yet: all four enter
    s.mark_encoded(s.schedule_encode(limit=2))
    assert s.schedule_admission() == []
    assert [a.slots for a in s.schedule_admission(fresh=2)] == [(4,), (5,)]


def test_a_fresh_run_without_slots_for_it_waits() -> None:
    s = scheduler(slots=4, admit_batch=2, admit_wait_s=60.0, lookahead=2)
    for _ in range(12):
        s.add(request(max_new=50))
    admit_all(s)  # four enter, two are encoded ahead
    step(s, {0: EOT})  # one slot free
    assert s.schedule_admission(fresh=2) == []  # two fresh windows, one free slot: wait for a second
    step(s, {1: EOT})
    assert [a.slots for a in s.schedule_admission(fresh=0)] == [(0,), (1,)]


def test_a_step_planned_before_the_admission_is_recorded_continues_from_the_prompt() -> None:
    # the engine launches an admission and the next step, then reads the admission's first token
    s = scheduler(slots=2)
    s.add(request(max_new=3))
    s.mark_encoded(s.schedule_encode(limit=4))
    admitted = s.schedule_admission()
    group = s.running_groups()[0]
    assert [seq.pending for seq in group.seqs] == [1] and group.prompt_len == 2
    plan = s.schedule_decode()
    assert plan is not None and plan.active == (0,) and plan.window >= 3  # reads position 2, after the prompt
    record(s, admitted, first_token=5)
    assert group.seqs[0].tokens == [5] and group.seqs[0].pending == 1
    assert s.record_step(plan, StepOutput((9, 0), (-0.5, -0.5))) == []
    assert group.seqs[0].tokens == [5, 9]
    assert step(s, {0: 4}) == [group.rid]  # the third token: max_new reached
    assert group.seqs[0].tokens == [5, 9, 4]


def test_a_group_cancelled_while_its_admission_runs_takes_nothing_from_it() -> None:
    s, group, admitted, plan = _admitted_and_planned()
    assert s.cancel(group) and group.finish == "cancelled" and s.running == 0
    assert s.record_admission(admitted[0], _result(admitted[0]), encode_ms=1.0) is None
    assert plan is not None and s.record_step(plan, StepOutput((9, 0), (-0.5, -0.5))) == []
    assert group.seqs[0].tokens == [] and not s.has_work


def test_an_admission_that_ends_at_once_drops_the_step_planned_for_it() -> None:
    s, group, admitted, plan = _admitted_and_planned()
    (done,) = [s.record_admission(a, _result(a, EOT), encode_ms=1.0) for a in admitted]
    assert done is group and group.finish == "eot"
    assert plan is not None and s.record_step(plan, StepOutput((9, 0), (-0.5, -0.5))) == []
    assert group.seqs[0].tokens == [EOT] and s.tokens_recorded == 0


def _admitted_and_planned() -> tuple[Scheduler, Group, list[Admission], DecodeStep | None]:
    """One request admitted (its admission not yet recorded) and the step planned behind it."""
    s = scheduler(slots=2)
    group = s.add(request(max_new=5))
    s.mark_encoded(s.schedule_encode(limit=4))
    admitted = s.schedule_admission()
    return s, group, admitted, s.schedule_decode()


def _result(a: Admission, token: int = 5) -> AdmitResult:
    return AdmitResult((token,) * len(a.slots), (-0.1,) * len(a.slots), (), 0.0, None)


def test_running_can_be_read_while_the_engine_thread_changes_the_groups() -> None:
    """Other threads read `running` (the metrics; which GPU a request takes) while the engine thread admits and
    finishes groups. Iterating the dict itself raised 'dictionary changed size during iteration' there: a 500
    under load on an H100 (session 23), the likely cause of session 22's lone /ws internal_error."""
    s = scheduler(8)
    stop = threading.Event()

    def engine_thread() -> None:
        rid = 0
        while not stop.is_set():
            s._running[rid] = SimpleNamespace(live=[0])  # type: ignore[assignment]
            s._running.pop(rid - 20, None)
            rid += 1

    churn = threading.Thread(target=engine_thread)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a thread switch between any two bytecodes of the reader, as under load
    churn.start()
    try:
        counts = [s.running for _ in range(20_000)]
    finally:
        stop.set()
        churn.join()
        sys.setswitchinterval(interval)
    assert max(counts) <= 21
