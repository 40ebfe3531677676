"""Executes what the scheduler decided: owns the model, the static caches, the slot state and the graphs.

`encode_async`: encode windows on a low-priority side stream, so the encoder overlaps decode steps
(`encode_ahead`, the engine's default while sequences decode), or in order on the engine's stream.
`launch_admit`: compute encoded windows' cross-attention keys/values into their slots, detect languages where
asked, prefill the prompts and sample each slot's first token. The model's part (cross keys/values and the
prompt through every layer, ~600 launches for large-v3) replays a CUDA graph per (rows bucket, prompt width)
for plain admissions; beams, samples of one window, language detection and long prompts run eagerly.
`launch_step`: one decode step over slots 0..size-1, replayed from a CUDA graph on the GPU.
`align_async`: word timing's teacher-forced pass over finished sequences and their DTW cost matrices, by the
runner's `Aligner` (engine/aligner.py) over the same cache.
Neither waits for the device: inputs go up through pinned memory (engine/transfer.py), and each returns a
handle whose `results()`/`result()` waits once and reads its tokens, so the host queues the next launches while
the device still runs the work queued before (an encoder run, an admission). `admit`/`step` wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from halkspeech.engine.aligner import Aligner, AlignPass
from halkspeech.engine.batch import Admission, AdmitResult, AlignJob, DecodeStep, SlotMove, SlotUpdate, StepOutput
from halkspeech.engine.cuda_graphs import GraphCache, no_restore, no_snapshot, padded_row_buckets, padded_rows
from halkspeech.engine.request import Alignment, SamplingOptions
from halkspeech.engine.sampling import FLAG_FIELDS, INT_FIELDS, Sampler, SlotState, TokenIds
from halkspeech.engine.transfer import HostCopies, to_device
from halkspeech.model.cache import KVCache
from halkspeech.model.whisper import Whisper

StepKey = tuple[int, int, bool, bool]  # (size, window, timestamps, sampling)
AdmitKey = tuple[int, int]  # (rows, padded up to a power of two; prompt width)
#: Prompts of at most this many tokens can replay an admission graph: the task prompts (sot, language, task,
#: no-timestamps) are 1-4 tokens; a previous-text prompt (long-form conditioning) is up to 224, and runs eagerly.
ADMIT_GRAPH_WIDTH = 8
SUPPRESS_ROWS = 16  # suppress-token masks kept on the device (least recently used dropped first)


@dataclass
class EncodeJob:
    """Windows being encoded: audio [n, 1500, D] is valid once ready() (CUDA events; None on a CPU)."""

    audio: Tensor
    begin: torch.cuda.Event | None
    done: torch.cuda.Event | None
    cpu_ms: float = 0.0
    inline: bool = False  # queued on the engine's own stream: what reads it next is ordered after it
    counted: bool = False  # its time is in the engine's stats

    def ready(self) -> bool:
        return self.inline or self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    @property
    def encode_ms(self) -> float:
        """Encoder time of the whole job (call when ready; read from the events once)."""
        if self.begin is None or self.done is None:
            return self.cpu_ms
        self.done.synchronize()  # already done by the time anyone asks (the admission read its first tokens)
        self.cpu_ms = float(self.begin.elapsed_time(self.done))
        self.begin = self.done = None
        return self.cpu_ms


@dataclass
class LaunchedStep:
    """A decode step queued on the device; `result()` waits for it (once) and reads its tokens."""

    copies: HostCopies  # tokens [size], chosen log-probabilities [size], then top-k indices and values
    top_slots: tuple[int, ...]

    def result(self) -> StepOutput:
        host = [t.tolist() for t in self.copies.wait()]
        top = {}
        if self.top_slots:
            top = {s: (tuple(t), tuple(lp)) for s, t, lp in zip(self.top_slots, host[2], host[3], strict=True)}
        return StepOutput(tuple(host[0]), tuple(host[1]), top)


@dataclass
class LaunchedAdmission:
    """An admission queued on the device; `results()` waits for it (once) and reads each admission's first
    tokens. Its slots' state is on the device already: a decode step queued after it continues them."""

    copies: HostCopies  # sampled [R], their log-probabilities [R], top-k tokens [R, k], top-k values, no-speech [n]
    admissions: tuple[Admission, ...]
    languages: list[dict[str, float] | None]

    def results(self) -> list[AdmitResult]:
        sampled, chosen, top_t, top_lp, no_speech = (t.tolist() for t in self.copies.wait())
        results, start = [], 0
        for i, a in enumerate(self.admissions):
            span = range(start, start + len(a.slots))
            start += len(a.slots)
            top = tuple((tuple(top_t[r][: a.top_k]), tuple(top_lp[r][: a.top_k])) for r in span) if a.top_k else ()
            results.append(
                AdmitResult(
                    tokens=tuple(sampled[r] for r in span),
                    logprobs=tuple(chosen[r] for r in span),
                    top=top,
                    no_speech_prob=no_speech[i],
                    language_probs=self.languages[i],
                )
            )
        return results


class Runner:
    def __init__(
        self,
        model: Whisper,
        ids: TokenIds,
        *,
        slots: int,
        max_encoder_batch: int = 32,
        cuda_graphs: bool = True,
        alignment_heads: tuple[tuple[int, int], ...] = (),
        encode_ahead: bool = False,
        encoder_graph_batch: int = 0,
        admission_graph_batch: int = 0,
        admission_widths: Sequence[int] = (),
        alignment_graph_rows: int = 0,
        alignment_prompt_len: int = 0,
    ) -> None:
        self.model = model
        self.ids = ids
        self.device = model.device
        self.dtype = model.dtype
        self.max_encoder_batch = max_encoder_batch
        audio = model.decoder.absorbed is not None  # large steps' cross-attention reads it (model/absorbed.py)
        self.cache = KVCache.allocate(model.dims, slots, dtype=self.dtype, device=self.device, audio=audio)
        self.state = SlotState.allocate(slots, model.dims.n_vocab, self.device)
        fused = model.decoder.fused_max_batch > 0  # the fused step kernels are on: so is the fused sampler
        self.sampler = Sampler(ids, self.device, fused_slots=slots if fused else 0)
        self._language_columns = torch.tensor(ids.language_tokens, dtype=torch.long, device=self.device)
        self._suppress_rows: dict[tuple[int, ...], Tensor] = {}
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: GraphCache[tuple[Tensor, Tensor, Tensor]] | None = (
            GraphCache(self._graph_body, self._snapshot, self._restore) if use_graphs else None
        )
        # encoder runs of up to encoder_graph_batch windows replay a graph per size, reading a static input
        self.encoder_graph_batch = encoder_graph_batch if use_graphs else 0
        self._mel_in: Tensor | None = None
        self.encoder_graphs: GraphCache[Tensor] | None = None
        if self.encoder_graph_batch:
            frames = 2 * model.dims.n_audio_ctx  # 3000 log-mel frames a window (the first conv has stride 1)
            shape = (self.encoder_graph_batch, model.dims.n_mels, frames)
            self._mel_in = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.encoder_graphs = GraphCache(self._encoder_body, no_snapshot, no_restore)
        # Admissions of up to admission_graph_batch plain rows (one slot each, no language detection) whose
        # prompts are `admission_widths` tokens long run the model's part from static inputs: audio [G, A, D],
        # and per row its slot, prompt length, <|sot|> index and right-padded prompt [G, 3 + ADMIT_GRAPH_WIDTH].
        # Rows are padded to a power of two by repeating the last one: the same values written twice to one slot.
        # A graph on a GPU; elsewhere the same padded body runs eagerly (what the CPU tests exercise).
        self.admit_graph_batch = admission_graph_batch
        self.admission_widths = frozenset(w for w in admission_widths if w <= ADMIT_GRAPH_WIDTH)
        self.admit_graphs: GraphCache[tuple[Tensor, Tensor]] | None = None
        if self.admit_graph_batch:
            dims = model.dims
            shape = (self.admit_graph_batch, dims.n_audio_ctx, dims.n_audio_state)
            self._admit_audio = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._admit_ints = torch.zeros(
                (self.admit_graph_batch, 3 + ADMIT_GRAPH_WIDTH), dtype=torch.long, device=self.device
            )
            if use_graphs:
                # no snapshot: a capture's warm-up run writes the rows now in the inputs, the values its replay
                # writes again (at engine start: slot 0's, free)
                self.admit_graphs = GraphCache(self._admit_body, no_snapshot, no_restore)
        self.aligner = Aligner(
            model,
            self.cache,
            ids,
            alignment_heads,
            graph_rows=alignment_graph_rows,
            prompt_len=alignment_prompt_len,
            use_graphs=use_graphs,
        )
        cuda = self.device.type == "cuda"
        # CUDA stream priorities: lower numbers win; the encoder stream keeps the lowest (default) priority
        self.stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self.encode_stream = torch.cuda.Stream(self.device, priority=0) if cuda and encode_ahead else None
        # (torch.compile of the step was measured and dropped: inductor functionalises the in-place cache
        # writes and copies the whole cache each step, 56 ms a step for large-v3 on an H200.)

    @property
    def slots(self) -> int:
        return self.cache.slots

    def stream_context(self) -> AbstractContextManager[object]:
        """Run the engine thread's work on a high-priority stream: when encoder kernels (low priority) and
        decode kernels wait for the same multiprocessors, the decode step goes first. The thread's current device
        is this engine's, for what launches without naming one (graph captures' streams, Triton kernels)."""
        if self.stream is None:
            return nullcontext()
        context = ExitStack()
        context.enter_context(torch.cuda.device(self.device))
        context.enter_context(torch.cuda.stream(self.stream))
        return context

    # --- encoding --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_async(self, features: Sequence[Tensor], ahead: bool = True) -> EncodeJob:
        """Start encoding log-mel windows [n_mels, 3000] each; the job's audio is ready once `ready()`. On the
        side stream if there is one and `ahead`; else inline, so what is queued after it waits on the device,
        not on the host (the engine encodes inline when nothing decodes: nothing to overlap, and a lone window's
        admission launches at once instead of after the host sees the run end, ~2 ms of turbo's 30)."""
        if self.stream is None:  # CPU: done when encode() returns
            started = time.perf_counter()
            audio = self.encode(torch.stack(list(features)))
            return EncodeJob(audio, None, None, (time.perf_counter() - started) * 1000)
        begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if self.encode_stream is None or not ahead:  # in order on this thread's stream: an admission waits for it
            self.stream.wait_stream(torch.cuda.default_stream(self.device))  # features from callers' threads
            begin.record()  # timed on the GPU: a host clock would only see the kernel launches
            audio = self.encode(torch.stack(list(features)))
            done.record()
            return EncodeJob(audio, begin, done, inline=True)
        # features come from callers' threads (their default stream) or from this thread's stream
        self.encode_stream.wait_stream(torch.cuda.default_stream(self.device))
        self.encode_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.encode_stream):
            begin.record()
            audio = self.encode(torch.stack(list(features)))
            done.record()
        return EncodeJob(audio, begin, done)

    def encode(self, features: Tensor) -> Tensor:
        """Log-mel windows [N, n_mels, 3000] → audio features [N, 1500, D]: a captured graph when N ≤
        encoder_graph_batch (one launch instead of ~550), else eagerly in encoder batches."""
        n = features.shape[0]
        if self.encoder_graphs is not None and n <= self.encoder_graph_batch:
            assert self._mel_in is not None
            self._mel_in[:n].copy_(features, non_blocking=True)
            # the graph's output is overwritten by its next replay; runs in flight each keep their own
            return self.encoder_graphs.run(n).clone()
        features = features.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return torch.cat([self.model.encoder(chunk) for chunk in features.split(self.max_encoder_batch)])

    def _encoder_body(self, key: Hashable) -> Tensor:
        assert self._mel_in is not None
        return cast(Tensor, self.model.encoder(self._mel_in[: cast(int, key)]))

    # --- admission -------------------------------------------------------------------------------------
    def admit(self, admissions: Sequence[Admission], rows: Sequence[tuple[EncodeJob, int]]) -> list[AdmitResult]:
        """`launch_admit`, waited for."""
        return self.launch_admit(admissions, rows).results()

    @torch.inference_mode()
    def launch_admit(self, admissions: Sequence[Admission], rows: Sequence[tuple[EncodeJob, int]]) -> LaunchedAdmission:
        """Cross keys/values from each admission's encoded window (job, row of its audio), then prefill
        and sample the first token of each admission, each slot's state written for the next decode step.
        Queued on the device; nothing waits for it unless a row detects its language (its prompt needs it)."""
        if self.stream is not None:
            for job in {id(job): job for job, _ in rows}.values():
                job.audio.record_stream(self.stream)  # made on the encoder stream, read on this one
        if self._graphable(admissions):
            return self._launch_admit_padded(admissions, rows)
        audio = torch.stack([job.audio[row] for job, row in rows])  # [n, 1500, D]
        first = to_device([a.slots[0] for a in admissions], torch.long, self.device)
        self.model.decoder.fill_cross(audio, self.cache, first)
        for a in admissions:
            for slot in a.slots[1:]:  # beams and samples share their window's keys/values
                self.cache.copy_cross(a.slots[0], slot)
        prompts, languages = self._detect_languages(admissions, first)
        return self._prefill(admissions, prompts, languages)

    def _graphable(self, admissions: Sequence[Admission]) -> bool:
        """Whether the admission graphs take these: few enough rows, a task prompt, one slot each, no detection."""
        return (
            len(admissions) <= self.admit_graph_batch
            and max(len(a.request.prompt) for a in admissions) in self.admission_widths
            and all(len(a.slots) == 1 and not a.request.detect_language for a in admissions)
        )

    def _launch_admit_padded(
        self, admissions: Sequence[Admission], rows: Sequence[tuple[EncodeJob, int]]
    ) -> LaunchedAdmission:
        """`launch_admit` for plain rows, through the static inputs of the (rows, width) admission graph."""
        n = len(admissions)
        padded_n = self._admit_rows(n)
        width = max(len(a.request.prompt) for a in admissions)
        order = [*range(n), *[n - 1] * (padded_n - n)]  # padding repeats the last row
        # per row: slot, prompt length, <|sot|> index, the prompt right-padded with end-of-text to `width`
        inputs: list[int] = []
        for i in order:
            request = admissions[i].request
            pad = [self.ids.eot] * (width - len(request.prompt))
            inputs += [admissions[i].slots[0], len(request.prompt), request.sot_index, *request.prompt, *pad]
        initial = [v for a in admissions for v in self._initial_state(list(a.request.prompt), a.request.options)]
        packed = to_device([*inputs, *initial], torch.long, self.device)  # one host→device copy
        ints = packed[: len(inputs)].view(padded_n, 3 + width)
        self._admit_ints[:padded_n, : 3 + width].copy_(ints)
        torch.stack([job.audio[row] for job, row in rows], out=self._admit_audio[:n])
        if padded_n > n:
            self._admit_audio[n:padded_n].copy_(self._admit_audio[n - 1 : n].expand(padded_n - n, -1, -1))
        key: AdmitKey = (padded_n, width)
        logits, no_speech = self.admit_graphs.run(key) if self.admit_graphs is not None else self._admit_body(key)
        return self._first_tokens(
            admissions, [None] * n, list(range(n)), logits[:n], no_speech[:n], ints[:n, 0], packed[len(inputs) :]
        )

    def _admit_rows(self, n: int) -> int:
        """Rows of the admission graph that takes n rows."""
        return padded_rows(n, self.admit_graph_batch)

    def _admit_body(self, key: Hashable) -> tuple[Tensor, Tensor]:
        """The model's part of a plain admission from the static inputs: first-token logits [G, V] and
        no-speech probabilities [G] (a graph's outputs: its next replay overwrites them)."""
        padded_n, width = cast(AdmitKey, key)
        ints = self._admit_ints[:padded_n]
        slots, lengths, sot_index = ints[:, 0], ints[:, 1], ints[:, 2]
        self.model.decoder.fill_cross(self._admit_audio[:padded_n], self.cache, slots)
        rows = torch.arange(padded_n, device=self.device)
        return self._prompt_logits(ints[:, 3 : 3 + width], slots, lengths, rows, sot_index)

    def _prompt_logits(
        self, tokens: Tensor, slots: Tensor, lengths: Tensor, head_rows: Tensor, sot_index: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Prefill right-padded prompts [R, P] into `slots` [R] → logits [R, V] after each row's last prompt
        token (`lengths` [R]), and each admission's no-speech probability [n] from its head row's <|sot|>."""
        hidden = self.model.decoder.prefill(tokens, self.cache, slots)  # [R, P, D]
        rows = torch.arange(tokens.shape[0], device=self.device)
        logits = self.model.decoder.logits(hidden[rows, lengths - 1][:, None])[:, 0]  # [R, V]
        at_sot = self.model.decoder.logits(hidden[head_rows, sot_index][:, None])[:, 0]
        return logits, at_sot.softmax(dim=-1)[:, self.ids.no_speech]

    def _detect_languages(
        self, admissions: Sequence[Admission], first: Tensor
    ) -> tuple[list[list[int]], list[dict[str, float] | None]]:
        """Language probabilities from <|startoftranscript|> alone (as the reference), and the prompts with
        the detected language token written in."""
        prompts = [list(a.request.prompt) for a in admissions]
        languages: list[dict[str, float] | None] = [None] * len(admissions)
        rows = [i for i, a in enumerate(admissions) if a.request.detect_language]
        if not rows or not self.ids.language_tokens:
            return prompts, languages
        sot = torch.full((len(rows), 1), self.ids.sot, device=self.device)
        hidden = self.model.decoder.prefill(sot, self.cache, first[to_device(rows, torch.long, self.device)])
        logits = self.model.decoder.logits(hidden)[:, 0].index_select(1, self._language_columns)
        probs = logits.softmax(dim=-1).cpu()
        for row, p in zip(rows, probs, strict=True):
            languages[row] = dict(zip(self.ids.language_codes, p.tolist(), strict=True))
            index = admissions[row].request.language_index
            if index is not None:
                prompts[row][index] = self.ids.language_tokens[int(p.argmax())]
        return prompts, languages

    def _prefill(
        self,
        admissions: Sequence[Admission],
        prompts: list[list[int]],
        languages: list[dict[str, float] | None],
    ) -> LaunchedAdmission:
        n = len(admissions)
        row_slots = [slot for a in admissions for slot in a.slots]  # R rows: every admission's slots
        row_of = [i for i, a in enumerate(admissions) for _ in a.slots]
        width = max(len(p) for p in prompts)
        padded = [tok for i in row_of for tok in prompts[i] + [self.ids.eot] * (width - len(prompts[i]))]
        heads = [row_of.index(i) for i in range(n)]  # each admission's first row
        r = len(row_slots)
        lengths_l = [len(prompts[i]) for i in row_of]
        sot_l = [a.request.sot_index for a in admissions]
        options = [admissions[i].request.options for i in row_of]
        initial = [v for i, o in zip(row_of, options, strict=True) for v in self._initial_state(prompts[i], o)]
        # one host→device copy for every index and the new rows' state: slots [R], prompt lengths [R], head rows
        # [n], <|sot|> index [n], right-padded prompts [R, P], state [R, I + F] (SlotState's ints, then its flags)
        ints, flags = len(INT_FIELDS), len(FLAG_FIELDS)
        packed = to_device([*row_slots, *lengths_l, *heads, *sot_l, *padded, *initial], torch.long, self.device)
        split = [r, r, n, n, r * width, r * (ints + flags)]
        slots, lengths, head_rows, sot_index, flat, state = packed.split(split)
        logits, no_speech = self._prompt_logits(flat.view(r, width), slots, lengths, head_rows, sot_index)
        return self._first_tokens(admissions, languages, row_of, logits, no_speech, slots, state)

    def _first_tokens(
        self,
        admissions: Sequence[Admission],
        languages: list[dict[str, float] | None],
        row_of: list[int],
        logits: Tensor,
        no_speech: Tensor,
        slots: Tensor,
        state: Tensor,
    ) -> LaunchedAdmission:
        """Sample each row's first token from `logits` [R, V] (row r of admission row_of[r], in `slots` [R])
        and write the rows' state (`state`: SlotState's ints then flags, flat), advanced by it, into the slots."""
        r, ints, flags = len(row_of), len(INT_FIELDS), len(FLAG_FIELDS)
        options = [admissions[i].request.options for i in row_of]
        # the new rows' state, sampled from and advanced as a block, then written into their slots
        state = state.view(r, ints + flags)
        view = SlotState(
            ints=state[:, :ints],
            flags=state[:, ints:].bool(),
            temperature=to_device([o.temperature for o in options], torch.float32, self.device),
            suppress=torch.stack([self._suppress_row(o.suppress_tokens) for o in options]),
        )
        timestamps = any(a.request.options.timestamps for a in admissions)
        sampling = any(a.request.options.temperature > 0 for a in admissions)
        sampled, chosen, scores = self.sampler.step(logits, view, timestamps=timestamps, sampling=sampling)
        self.state.write(slots, view)
        top_k = max(a.top_k for a in admissions)
        if top_k:
            top_lp, top_t = torch.log_softmax(scores, dim=-1).topk(top_k, dim=-1)  # (values, indices)
        else:
            top_t, top_lp = sampled[:, None], chosen[:, None]
        copies = HostCopies.queue(sampled, chosen, top_t, top_lp, no_speech)
        return LaunchedAdmission(copies, tuple(admissions), languages)

    def _initial_state(self, prompt: list[int], o: SamplingOptions) -> tuple[int, ...]:
        """A newly admitted row's SlotState (ints, then flags): the prompt's last token at position len-1,
        nothing sampled yet, its options, active."""
        max_initial = self.ids.vocab - 1
        if o.max_initial_timestamp_index is not None:
            max_initial = self.ids.timestamp_begin + o.max_initial_timestamp_index
        # INT_FIELDS: tokens, positions, prev, n_gen, last_ts, max_initial; FLAG_FIELDS: ts_rules, blank, no_eot,
        # active
        row = (prompt[-1], len(prompt) - 1, -1, 0, -1, max_initial, o.timestamps, o.suppress_blank, o.force_length, 1)
        assert len(row) == len(INT_FIELDS) + len(FLAG_FIELDS)
        return row

    def _suppress_row(self, tokens: tuple[int, ...]) -> Tensor:
        """The [vocab] mask of a suppress set, kept for the most recent SUPPRESS_ROWS sets (the default one is
        nearly every request's; a library caller with a new set per request grew the cache without bound)."""
        row = self._suppress_rows.pop(tokens, None)
        if row is None:
            row = torch.zeros(self.ids.vocab, dtype=torch.bool, device=self.device)
            row[list(tokens)] = True
            if len(self._suppress_rows) >= SUPPRESS_ROWS:
                del self._suppress_rows[next(iter(self._suppress_rows))]  # the least recently used
        self._suppress_rows[tokens] = row  # (re)inserted last: most recently used
        return row

    # --- decoding --------------------------------------------------------------------------------------
    def step(self, step: DecodeStep) -> StepOutput:
        """Run one decode step over slots 0..step.size-1; returns each slot's new token."""
        return self.launch_step(step).result()

    @torch.inference_mode()
    def launch_step(self, step: DecodeStep) -> LaunchedStep:
        """Queue one decode step and the copies of its results to the host; nothing waits for the device, so
        the engine can plan and queue the next step before reading this one's tokens."""
        self._apply_moves(step.moves)
        self._apply_updates(step.updates)
        key = self._step_key(step.size, step.window, step.timestamps, step.sampling)
        if self.graphs is not None:
            tokens, chosen, scores = self.graphs.run(key)  # the graph's buffers: the next replay overwrites them
        else:  # executed already: copied, in case they share memory with the state the next step advances
            tokens, chosen, scores = self._graph_body(key)
            tokens, chosen = tokens.clone(), chosen.clone()
        if not step.top_slots:
            return LaunchedStep(HostCopies.queue(tokens, chosen), ())
        rows = to_device(step.top_slots, torch.long, self.device)
        values, indices = torch.log_softmax(scores.index_select(0, rows), dim=-1).topk(step.top_k, dim=-1)
        return LaunchedStep(HostCopies.queue(tokens, chosen, indices, values), step.top_slots)

    def _step_key(self, size: int, window: int, timestamps: bool, sampling: bool) -> StepKey:
        """A step's graph: with the fused kernels on, every step reads each slot's keys up to its position
        whatever the window, so a size shares one graph across window buckets (one capture, not one per bucket)."""
        return (size, self.model.decoder.step_window(window), timestamps, sampling)

    def _graph_body(self, key: Hashable) -> tuple[Tensor, Tensor, Tensor]:
        size, window, timestamps, sampling = cast(StepKey, key)
        return self._decode_and_sample(size, window, timestamps, sampling)

    def _decode_and_sample(
        self, size: int, window: int, timestamps: bool, sampling: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        view = self.state.rows(slice(0, size))
        logits = self.model.decoder.step(view.tokens, view.positions, self.cache, window)
        return self.sampler.step(logits, view, timestamps=timestamps, sampling=sampling)

    # --- word-timing alignment (engine/aligner.py) -------------------------------------------------------
    def align(self, jobs: Sequence[AlignJob]) -> list[Alignment]:
        """`align_async`, waited for."""
        return self.aligner.align(jobs)

    def align_async(self, jobs: Sequence[AlignJob], max_jobs: int = 16, max_rows: int = 2048) -> AlignPass:
        """Word timing's pass over finished sequences whose slots still hold their windows: `Aligner.align_async`."""
        return self.aligner.align_async(jobs, max_jobs, max_rows)

    @torch.inference_mode()
    def warm_up(self, sizes: Sequence[int], windows: Sequence[int]) -> int:
        """Capture the decode-step graphs of every (batch bucket, window bucket), with and without timestamp
        rules, the encoder's graphs and the admission graphs, before serving: a capture on the serving path
        stalls every running sequence. Returns how many graphs there are."""
        if self.graphs is None:
            return 0
        for size in sizes:
            for window in windows:
                for timestamps in (False, True):
                    self.graphs.capture(self._step_key(size, window, timestamps, False))
        if self.encoder_graphs is not None:
            for n in range(1, self.encoder_graph_batch + 1):
                self.encoder_graphs.capture(n)
        if self.admit_graphs is not None:
            for n in padded_row_buckets(self.admit_graph_batch):
                for width in sorted(self.admission_widths):
                    self.admit_graphs.capture((n, width))
        graphs = (self.graphs, self.encoder_graphs, self.admit_graphs)
        return sum(len(g or ()) for g in graphs) + self.aligner.warm_up()

    def release(self, slots: Sequence[int]) -> None:
        """Slots whose sequences ended: idle until reassigned."""
        if slots:
            self.state.active.index_fill_(0, to_device(list(slots), torch.long, self.device), False)

    def _apply_moves(self, moves: Sequence[SlotMove]) -> None:
        """Compaction: each moved sequence's caches and state go to its new slot, in a few torch calls however
        many move (it was nine a moved slot). Each call gives up the GIL, and under load winning it back waits
        for the request threads; a compaction moves every sequence above a step bucket at once. py-spy found the
        server's engine thread in compaction 14.5% of the time (H100, session 33), and 32 moves took 120.5 ms
        against 12.0 on a CPU with another thread holding the GIL (bench/engine_moves.py)."""
        if not moves:
            return
        pairs = [(move.source, move.dest) for move in moves]
        self.cache.move_slots(pairs, max(move.position for move in moves) + 1)  # beyond a slot's position: unread
        index = to_device(pairs, torch.long, self.device)
        source, dest = index[:, 0], index[:, 1]
        for tensor in self.state.tensors():
            tensor[dest] = tensor[source]
        self.state.active[source] = False

    def _apply_updates(self, updates: Sequence[SlotUpdate]) -> None:
        """Beam reordering: each surviving beam takes its source's self-attention cache and new state."""
        if not updates:
            return
        # one copy: destination, source, then the first five of SlotState's ints (tokens, positions, prev, n_gen,
        # last_ts)
        rows = [(u.slot, u.source, u.token, u.position, u.prev, u.n_gen, u.last_ts) for u in updates]
        packed = to_device(rows, torch.long, self.device)
        dst, src = packed[:, 0], packed[:, 1]
        length = max(u.position for u in updates)
        kv = self.cache.self_kv[:, src, :length]  # advanced indexing copies, so sources can be overwritten
        self.cache.self_kv[:, dst, :length] = kv
        self.state.ints[dst, :5] = packed[:, 2:]

    # --- graph support ---------------------------------------------------------------------------------
    def _snapshot(self) -> object:
        return [t.clone() for t in self.state.tensors()[:3]]  # all but `suppress`, which a step never writes

    def _restore(self, saved: object) -> None:
        assert isinstance(saved, list)
        for tensor, value in zip(self.state.tensors(), saved, strict=False):
            tensor.copy_(value)
