"""The engine loop: one thread per device that encodes, admits, steps and completes requests from every
caller.

Callers on any thread `submit` a DecodeRequest and get a DecodeHandle (a concurrent Future plus cancel);
asyncio callers `await engine.decode(request)`. Each iteration (vLLM's `EngineCore.step`, with encoder runs
of their own: on a low-priority side stream by default (engine.encode_ahead), else inline on the decode stream):
    groups = scheduler.schedule_encode(chunk); runner.encode_async(...)      # up to two runs in flight
    scheduler.mark_encoded(groups of finished jobs)
    admissions = scheduler.schedule_admission(); runner.launch_admit(...)
    step = scheduler.schedule_decode(); launched = runner.launch_step(step)
    scheduler.record_admission / record_step(what was launched before `step`)   # read while `step` runs
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from halkspeech.engine.aligner import AlignPass
from halkspeech.engine.batch import Admission, AlignJob, DecodeStep
from halkspeech.engine.request import DecodeRequest, DecodeResult
from halkspeech.engine.runner import EncodeJob, LaunchedAdmission, LaunchedStep, Runner
from halkspeech.engine.scheduler import Group, Scheduler
from halkspeech.errors import Cancelled, EngineStopped, HalkSpeechError, Overloaded

log = logging.getLogger(__name__)

TokenListener = Callable[[list[int]], None]
ENCODE_JOBS = 2  # one running and one queued behind it, so the encoder stream never idles
LIVE_HOLD_S = 0.1  # file windows wait at most this long for live turns to finish decoding
ALIGN_BATCH = 16  # finished windows whose word-timing passes run together (at most the runner's chunk)
ALIGN_WAIT_S = 0.025  # ... or once the first of them waited this long


@dataclass
class Admitting:
    """An admission launched on the device, its first tokens not yet read."""

    admissions: list[Admission]
    rows: list[tuple[EncodeJob, int]]  # each admission's encoder run and row of it
    launched: LaunchedAdmission


InFlight = Admitting | tuple[DecodeStep, LaunchedStep]


class DecodeHandle:
    """A submitted request: its future result, a way to cancel it, and (optionally) its tokens as they come."""

    def __init__(self, engine: Engine, request: DecodeRequest, on_tokens: TokenListener | None) -> None:
        self.engine = engine
        self.request = request
        self.on_tokens = on_tokens
        self.future: concurrent.futures.Future[DecodeResult] = concurrent.futures.Future()
        self.group: Group | None = None
        self.reported = 0
        # A caller that cancels the future itself (asyncio.wrap_future under a timeout does) cancels the work.
        self.future.add_done_callback(self._cancelled_by_caller)

    def _cancelled_by_caller(self, future: concurrent.futures.Future[DecodeResult]) -> None:
        if future.cancelled():
            self.engine._post("cancel", (self,))

    def cancel(self) -> None:
        """Stop the work; its slots are freed at the next step boundary. Harmless after completion."""
        if not self.future.done():
            self.engine._post("cancel", (self,))

    def result(self, timeout: float | None = None) -> DecodeResult:
        return self.future.result(timeout)

    async def wait(self) -> DecodeResult:
        """Await the result; cancelling the awaiting task cancels the engine work too."""
        waiter = asyncio.wrap_future(self.future)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            # the engine will complete the future with Cancelled: consume it, or asyncio logs an error for
            # every request whose client went away
            waiter.add_done_callback(_consume_outcome)
            self.cancel()
            raise


def _consume_outcome(future: asyncio.Future[DecodeResult]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: concurrent.futures.Future[DecodeResult], outcome: DecodeResult | BaseException) -> bool:
    """Give a future its result or exception, unless its caller has cancelled it (then nobody waits for it;
    setting it would raise InvalidStateError on the engine thread, which ended the loop)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        return False
    return True


#: Upper bounds (seconds) of the engine's duration histograms: Prometheus buckets, /metrics renders them.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Durations:
    """A histogram of durations: how many fell in each bucket (at or under its bound of DURATION_BUCKETS and
    over the one before; the last count: over them all), and their sum. The engine thread adds; /metrics
    reads."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total_s += seconds


@dataclass
class EngineStats:
    """Counters the API exports as metrics; updated by the engine thread only (`rejected`: by callers, under
    the engine's post lock)."""

    steps: int = 0
    admitted: int = 0
    admit_calls: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # windows refused at submit: the decode queue was full (429)
    tokens: int = 0  # tokens decode steps gave to sequences (not rows computed for ones that had ended)
    encoder_batches: Counter[int] = field(default_factory=Counter)  # windows per encoder call → count
    decode_batches: Counter[int] = field(default_factory=Counter)  # active sequences per step → count
    busy_s: float = 0.0
    # Where the engine thread's time goes (host clocks around each phase). A phase that reads a result from
    # the device also waits for the work queued before it: an inline encoder run shows up in the admission
    # or step after it, and `encode_s` (CUDA events) says how much of that was the encoder.
    encode_s: float = 0.0
    admit_s: float = 0.0
    step_s: float = 0.0
    align_s: float = 0.0  # queuing word-timing passes, and reading their results back
    align_calls: int = 0
    # Completed windows' times from submission: to their encoder run (the queue), and to their result.
    queue_wait: Durations = field(default_factory=Durations)
    window_time: Durations = field(default_factory=Durations)

    def phases(self) -> dict[str, float]:
        """Seconds per phase since the counters were last reset, for benchmarks."""
        return {
            "busy_s": self.busy_s,
            "encode_s": self.encode_s,
            "admit_s": self.admit_s,
            "step_s": self.step_s,
            "align_s": self.align_s,
        }


class Engine:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        *,
        batch_window_ms: float = 0.0,
        decoding_encoder_batch: int = 16,
        decoding_encoder_wait_ms: float = 0.0,
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.batch_window_s = batch_window_ms / 1000
        # encoder runs while sequences decode (EngineSettings.decoding_encoder_*)
        self.decoding_encoder_batch = decoding_encoder_batch
        self.decoding_encoder_wait_s = decoding_encoder_wait_ms / 1000
        self.stats = EngineStats()
        # messages to the loop: ("submit" | "cancel" | "wake", handles); a batch's handles travel in one message
        self._inbox: queue.SimpleQueue[tuple[str, tuple[DecodeHandle, ...]]] = queue.SimpleQueue()
        # windows submitted and still in the inbox (cancel and wake messages are not queued work)
        self._posted = 0
        self._posted_lock = threading.Lock()
        self._handles: dict[int, DecodeHandle] = {}
        self._jobs: deque[tuple[EncodeJob, list[Group]]] = deque()
        self._encoded: dict[int, tuple[EncodeJob, int]] = {}  # rid → (job, row of its audio)
        self._to_align: list[Group] = []  # finished, waiting for a batched word-timing pass (slots held)
        self._aligning: deque[tuple[AlignPass, list[Group]]] = deque()  # passes queued on the device
        # admissions and steps launched, their tokens not yet read, oldest first
        self._in_flight: deque[InFlight] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="halkspeech-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; unfinished requests fail with EngineStopped."""
        self._stopping.set()
        self._post("wake", ())
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def queue_depth(self) -> int:
        # windows not yet in a slot: in the scheduler's queue, or submitted and not yet taken from the inbox
        return self.scheduler.queue_depth + self._posted

    @property
    def max_group_size(self) -> int:
        """The most decoder slots one ordinary request may take at once (its beams or samples)."""
        return self.scheduler.max_group_size()

    @property
    def running(self) -> int:
        return self.scheduler.running

    # --- submission ------------------------------------------------------------------------------------
    def submit(self, request: DecodeRequest, on_tokens: TokenListener | None = None) -> DecodeHandle:
        """Queue a request (thread-safe). Raises Overloaded at once when the queue is full."""
        handle = DecodeHandle(self, request, on_tokens)
        self._queue((handle,))
        return handle

    def submit_many(self, requests: Sequence[DecodeRequest]) -> list[DecodeHandle]:
        """Queue several requests as one batch (thread-safe): the loop takes them together, so they share an
        encoder run and an admission, where requests submitted one by one may be split between two runs if the
        loop wakes between them. Raises Overloaded, queuing none, when they do not all fit."""
        handles = tuple(DecodeHandle(self, request, None) for request in requests)
        self._queue(handles)
        return list(handles)

    def _queue(self, handles: tuple[DecodeHandle, ...]) -> None:
        """Post new handles to the loop in one message, or raise: the engine stopped, or they do not fit."""
        if not self.alive:
            raise EngineStopped("the engine is not running")
        with self._posted_lock:  # the check and the count as one: two callers cannot both take the last room
            if self.queue_depth + len(handles) > self.scheduler.max_queue:
                self.stats.rejected += len(handles)
                if len(handles) == 1:
                    raise Overloaded(f"the decode queue is full ({self.scheduler.max_queue} windows waiting)")
                raise Overloaded(f"the decode queue cannot take {len(handles)} more windows")
            self._posted += len(handles)
            self._post("submit", handles)

    async def decode(self, request: DecodeRequest, on_tokens: TokenListener | None = None) -> DecodeResult:
        return await self.submit(request, on_tokens).wait()

    def _post(self, kind: str, handles: tuple[DecodeHandle, ...]) -> None:
        self._inbox.put((kind, handles))

    # --- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with self.runner.stream_context():
                self._serve()
        except BaseException:  # the loop must never die silently: fail everyone, say why
            log.exception("engine loop failed")
        finally:
            self._fail_all(EngineStopped("the engine stopped"))

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self._drain(block=not self._has_work)
            if self._has_work:
                started = time.perf_counter()
                self._iterate()
                self.stats.busy_s += time.perf_counter() - started

    @property
    def _has_work(self) -> bool:
        """Requests in the scheduler, or finished ones waiting for their word-timing pass or its results."""
        return self.scheduler.has_work or bool(self._to_align) or bool(self._aligning) or bool(self._in_flight)

    def _drain(self, *, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        if block and self.batch_window_s:
            time.sleep(self.batch_window_s)  # let a burst arrive so it shares one encoder call
        while True:
            kind, handles = message
            try:
                for handle in handles:
                    self._handle(kind, handle)
            finally:
                self._taken(kind, handles)  # after: in the scheduler's queue now (counted twice for a moment)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _taken(self, kind: str, handles: tuple[DecodeHandle, ...]) -> None:
        """A message is out of the inbox: its windows no longer count as posted."""
        if kind == "submit":
            with self._posted_lock:
                self._posted -= len(handles)

    def _handle(self, kind: str, handle: DecodeHandle) -> None:
        if kind == "submit":
            try:
                handle.group = self.scheduler.add(handle.request)
                self._handles[handle.group.rid] = handle
            except HalkSpeechError as exc:
                _settle(handle.future, exc)
        elif kind == "cancel" and handle.group is not None and self.scheduler.cancel(handle.group):
            if self.scheduler.is_encoding(handle.group):
                return  # completed when its encoder run ends (mark_encoded hands it back)
            self._encoded.pop(handle.group.rid, None)
            self._complete(handle.group)  # between steps: its slots are free for the next admission

    def _iterate(self) -> None:
        finished: list[Group] = []
        admissions: list[Admission] = []
        step = None
        try:
            self._collect_encoded()
            runs = self.stats.encoder_batches.total()
            fresh = self._launch_encodes()
            self._collect_encoded()  # on a CPU the job finished at launch
            if self.runner.device.type == "cpu" and self.stats.encoder_batches.total() > runs:
                # the run took seconds on this thread: cancels that came meanwhile go first, so their windows
                # are not admitted and decoded (a batched request's client left; 16 windows were admitted after)
                self._drain(block=False)
            admissions = self.scheduler.schedule_admission(fresh)
            if admissions:
                # Launched, not waited for: the next step is queued behind it at once, and its first tokens are
                # read while that step runs. (Waiting here left the GPU idle from the admission's end until the
                # engine thread, which must win the GIL back from the request threads, launched the next step.)
                began = time.perf_counter()
                rows = [self._encoded.pop(a.rid) for a in admissions]
                try:
                    launched = self.runner.launch_admit(admissions, rows)
                except Exception as exc:  # these requests fail, not the ones already decoding
                    log.exception("admission failed; failing its %d requests", len(admissions))
                    for admission in admissions:
                        self._fail(self.scheduler.abort(self.scheduler.running_group(admission.rid)), exc)
                    admissions = []
                else:
                    self._in_flight.append(Admitting(admissions, rows, launched))
                self.stats.admitted += len(admissions)
                self.stats.admit_calls += 1
                self.stats.admit_s += time.perf_counter() - began
            if self.scheduler.lockstep:  # nothing planned ahead (see Scheduler.lockstep)
                finished.extend(self._record_in_flight(keep=0))
            step = self.scheduler.schedule_decode()
            if step is None and not admissions and self._jobs and not self._in_flight:
                self._jobs[0][0].wait()  # nothing to decode until the encoder delivers: sleep on it
            if step is not None:
                began = time.perf_counter()
                self._in_flight.append((step, self.runner.launch_step(step)))
                self.stats.step_s += time.perf_counter() - began
                self.stats.steps += 1
                self.stats.decode_batches[len(step.active)] += 1
            # One step ahead: what was launched before this step is read while the device runs it, so the host's
            # bookkeeping does not leave the GPU idle between steps. Not while beams or samples run (lockstep).
            keep = 1 if step is not None and not self.scheduler.lockstep else 0
            finished.extend(self._record_in_flight(keep=keep))
            self._report_tokens(self.scheduler.running_groups() + finished)
        except Exception as exc:  # a failed step fails the requests in it, not the server
            log.exception("engine step failed; failing the running requests")
            step = None  # `finished` ones had left the scheduler: they complete below, or nothing would
            self._in_flight.clear()
            self.scheduler.discard_plans()
            for group in self.scheduler.running_groups():
                self._fail(self.scheduler.abort(group), exc)
        # Their slots stop decoding, in one copy for all of them (a step's finished groups are often a whole
        # admission: one copy each cost the engine thread ~0.4 ms apiece while the GPU idled, H200 timeline).
        # A group that waits for its word-timing pass keeps its slots (cross keys/values intact) until it runs.
        self.runner.release([slot for group in finished for slot in group.slots])
        for group in finished:
            if self.scheduler.needs_alignment(group):
                self._to_align.append(group)
            else:
                self._complete(group, release=False)
        while self._to_align and (
            len(self._to_align) >= ALIGN_BATCH
            or step is None  # nothing else to do
            or self.scheduler.starved
            or time.perf_counter() - self._to_align[0].finished_at >= ALIGN_WAIT_S
        ):
            # one pass per ALIGN_BATCH: 17 waiting make a pass of 16 now and leave 1 to wait for company,
            # not two passes (16 + 1) back to back
            pending, self._to_align = self._to_align[:ALIGN_BATCH], self._to_align[ALIGN_BATCH:]
            self._align(pending)
        self._collect_aligned(wait=step is None and not admissions)

    def _record_in_flight(self, keep: int) -> list[Group]:
        """Read and record what is in flight, oldest first, leaving the newest `keep`; returns the groups that
        finished."""
        finished: list[Group] = []
        while len(self._in_flight) > keep:
            item = self._in_flight.popleft()
            if isinstance(item, Admitting):
                finished.extend(self._record_admission(item))
            else:
                finished.extend(self._record(*item))
        return finished

    def _record_admission(self, item: Admitting) -> list[Group]:
        began = time.perf_counter()
        finished = []
        results = item.launched.results()
        for admission, result, (job, _) in zip(item.admissions, results, item.rows, strict=True):
            # each window its share of the run that encoded it: a request's windows add up to its part of the
            # encoder's time (each was charged the whole run: 159 s of encoder in a 36 s batched request)
            done = self.scheduler.record_admission(admission, result, job.encode_ms / len(job.audio))
            if done is not None:
                finished.append(done)
            if not job.counted:  # a job's time once, however many of its windows are admitted
                job.counted = True
                self.stats.encode_s += job.encode_ms / 1000
        self.stats.admit_s += time.perf_counter() - began
        return finished

    def _record(self, step: DecodeStep, launched: LaunchedStep) -> list[Group]:
        """Wait for a launched step's tokens and record them; returns the groups that finished."""
        began = time.perf_counter()
        output = launched.result()
        self.stats.step_s += time.perf_counter() - began
        tokens = self.scheduler.tokens_recorded
        finished = self.scheduler.record_step(step, output)
        self.stats.tokens += self.scheduler.tokens_recorded - tokens
        return finished

    def _align(self, wanted: list[Group]) -> None:
        """Queue the word-timing pass of finished requests that asked for it (an eager pass is ~150 launched kernels
        however many windows it aligns, hence batches; batched mode's replay graphs of up to 4 windows). Their slots
        are free at once: work queued after the pass runs after it. They complete when its results reach the host
        (`_collect_aligned`)."""
        eot = self.scheduler.eot
        jobs = []
        for group in wanted:
            text = tuple(t for t in self.scheduler.result(group, 0.0).tokens if t < eot)
            prompt = group.request.alignment_prompt
            assert prompt is not None
            jobs.append(AlignJob(group.slots[0], prompt, text, group.request.alignment_frames))
        began = time.perf_counter()
        self.stats.align_calls += 1
        try:
            self._aligning.append((self.runner.align_async(jobs), wanted))
        except Exception:  # timings are an extra: a failed pass leaves them out, the text still returns
            log.exception("word-timing alignment failed")
            for group in wanted:
                self._complete(group, release=False)
        finally:
            for group in wanted:
                self.scheduler.release_held(group)
            self.stats.align_s += time.perf_counter() - began

    def _collect_aligned(self, *, wait: bool) -> None:
        """Complete the requests of word-timing passes whose results are on the host (`wait`: the oldest pass's,
        however long the device takes: there is nothing else to do)."""
        while self._aligning and (wait or self._aligning[0][0].ready()):
            wait = False
            began = time.perf_counter()
            done, groups = self._aligning.popleft()
            try:
                for group, alignment in zip(groups, done.results(), strict=True):
                    group.alignment = alignment
            except Exception:  # as above: the text still returns
                log.exception("word-timing alignment failed")
            self.stats.align_s += time.perf_counter() - began
            for group in groups:
                self._complete(group, release=False)  # released when they finished: the slots may be reused

    def _launch_encodes(self) -> int:
        """Start an encoder run if one is due; returns its windows if it was queued inline (on the stream the
        admissions use, so an admission of them now is ordered after it), else 0."""
        if len(self._jobs) >= ENCODE_JOBS or self.scheduler.file_work_held(LIVE_HOLD_S):
            return 0
        # Idle: encode all that waits in one run. Decoding: runs of decoding_encoder_batch (16: runs sized by the
        # backlog were measured to starve the decoder, server throughput 0.80 → 0.70 of the engine's on an
        # H200), so a live turn never waits behind a long encoder run.
        chunk = self.scheduler.max_encoder_batch
        if self.scheduler.decoding:
            chunk = min(chunk, self.decoding_encoder_batch)
            if self.scheduler.waiting < chunk and not self.scheduler.waited(self.decoding_encoder_wait_s):
                return 0
        groups = self.scheduler.schedule_encode(chunk)
        if not groups:
            return 0
        try:
            job = self.runner.encode_async([g.request.features for g in groups], ahead=self.scheduler.decoding)
        except Exception as exc:  # e.g. out of memory for this batch: fail these requests, keep serving
            log.exception("encoder run failed; failing its %d requests", len(groups))
            for group in groups:
                self.scheduler.drop_encoding(group)
                self._fail(group, exc)
            return 0
        self._jobs.append((job, groups))
        self.stats.encoder_batches[len(groups)] += 1
        return len(groups) if job.inline else 0

    def _collect_encoded(self) -> None:
        while self._jobs and self._jobs[0][0].ready():
            job, groups = self._jobs.popleft()
            for row, group in enumerate(groups):
                self._encoded[group.rid] = (job, row)
            for dropped in self.scheduler.mark_encoded(groups):  # cancelled while encoding
                self._encoded.pop(dropped.rid, None)
                self._complete(dropped)

    def _report_tokens(self, groups: list[Group]) -> None:
        for group in groups:
            handle = self._handles.get(group.rid)
            if handle is None or handle.on_tokens is None or group.beam is not None or len(group.seqs) != 1:
                continue
            tokens = group.seqs[0].tokens
            if len(tokens) > handle.reported:
                fresh = [t for t in tokens[handle.reported :] if t != self.scheduler.eot]
                handle.reported = len(tokens)
                if fresh:
                    try:
                        handle.on_tokens(fresh)
                    except Exception:  # a caller's listener: it hears no more; the request, and others, go on
                        log.exception("a token listener failed; it is detached from its request")
                        handle.on_tokens = None

    def _complete(self, group: Group, *, release: bool = True) -> None:
        if release:  # not for a group released before its word-timing pass: its slots may be another's now
            self.runner.release(group.slots)
        handle = self._handles.pop(group.rid, None)
        if handle is None:
            return
        if group.finish == "cancelled" or handle.future.cancelled():
            self.stats.cancelled += 1
            _settle(handle.future, Cancelled("the request was cancelled"))
            return
        if handle.future.done():
            return
        now = time.perf_counter()
        decode_ms = (now - group.admitted) * 1000 if group.admitted else 0.0
        self.stats.completed += 1
        if group.encoding:
            self.stats.queue_wait.add(group.encoding - group.submitted)
        self.stats.window_time.add(now - group.submitted)
        result = self.scheduler.result(group, decode_ms)
        if group.alignment is not None:
            result = dataclasses.replace(result, alignment=group.alignment)
        _settle(handle.future, result)

    def _fail(self, group: Group, exc: BaseException) -> None:
        self.runner.release(group.slots)
        handle = self._handles.pop(group.rid, None)
        if handle is not None and _settle(handle.future, exc):
            self.stats.failed += 1

    def _fail_all(self, exc: HalkSpeechError) -> None:
        """The loop has ended: every request fails, and the queue and running counts go back to 0."""
        self.scheduler.clear()
        handles = list(self._handles.values())
        self._handles.clear()
        while True:
            try:
                kind, posted = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._taken(kind, posted)
            handles += [h for h in posted if kind == "submit"]
        for handle in handles:
            if _settle(handle.future, exc):
                self.stats.failed += 1
