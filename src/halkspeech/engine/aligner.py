"""Word timing's device pass: a teacher-forced pass over finished sequences and their DTW cost matrices.

Each finished sequence whose slot still holds its window's cross-attention keys/values is run again over its
alignment prompt + text + end-of-text; the alignment heads' scores become a [text + 1, frames] cost matrix on
the device (engine/align.py), and each text token's probability comes from one logits pass. Batched mode's
windows replay a CUDA graph per (rows bucket, width bucket) (eagerly ~150 launches for turbo, ~900 for
large-v3); sequential mode's, which need the raw scores, run eagerly. Nothing waits for the device: the
returned `AlignPass` waits once, when its results are read. The Runner owns one and shares its cache with it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from halkspeech.engine.align import cost_matrices, padded_cost_matrices
from halkspeech.engine.batch import AlignJob
from halkspeech.engine.cuda_graphs import GraphCache, no_restore, no_snapshot, padded_row_buckets, padded_rows
from halkspeech.engine.request import Alignment
from halkspeech.engine.sampling import TokenIds
from halkspeech.engine.transfer import queue_to_host, to_device
from halkspeech.model.cache import KVCache
from halkspeech.model.whisper import Whisper

AlignKey = tuple[int, int]  # (rows, padded up to a power of two; tokens, padded up to a multiple of ALIGN_WIDTH_STEP)
#: Word-timing passes whose windows have at most this many alignment-prompt + text + end-of-text tokens can replay
#: an alignment graph: a window's text is at most n_text_ctx / 2 = 224 tokens, plus 2-4 of prompt and one.
ALIGN_GRAPH_WIDTH = 256
ALIGN_WIDTH_STEP = 32


@dataclass
class AlignPass:
    """Word-timing passes queued on the device: their results, once the work before `done` has run."""

    done: torch.cuda.Event | None  # None on a CPU: done already
    builders: list[Callable[[], list[Alignment]]]
    order: list[int] | None = None  # the builders' results are jobs[order[0]], jobs[order[1]], ... (None: in order)

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def results(self) -> list[Alignment]:
        if self.done is not None:
            self.done.synchronize()
        results = [alignment for build in self.builders for alignment in build()]
        if self.order is None:
            return results
        ordered: list[Alignment | None] = [None] * len(results)
        for position, index in enumerate(self.order):
            ordered[index] = results[position]
        return cast(list[Alignment], ordered)


class Aligner:
    """Queues word-timing passes over the slots of `cache` (the Runner's)."""

    def __init__(
        self,
        model: Whisper,
        cache: KVCache,
        ids: TokenIds,
        heads: tuple[tuple[int, int], ...],
        *,
        graph_rows: int = 0,
        prompt_len: int = 0,
        use_graphs: bool = False,
    ) -> None:
        self.model = model
        self.cache = cache
        self.ids = ids
        self.heads = heads
        self.device = model.device
        # Passes of up to graph_rows windows, each with its cost matrix's frames and an alignment prompt of
        # prompt_len tokens, run from static inputs: per row the right-padded tokens, then its slot, its token
        # count and its frames [R, ALIGN_GRAPH_WIDTH + 3]. Rows are padded to a power of two by repeating the last
        # one (a pass writes nothing). Eagerly a pass is ~150 launches for turbo and ~900 for large-v3, which the
        # GPU waits for: 12 points of word timing's 21% throughput loss on an H100 (bench/NOTES.md). A graph on a
        # GPU; elsewhere the same padded body runs eagerly.
        self.graph_rows = graph_rows if heads else 0
        self.prompt_len = prompt_len
        self.graphs: GraphCache[tuple[Tensor, Tensor]] | None = None
        if self.graph_rows:
            columns = ALIGN_GRAPH_WIDTH + 3
            self._ints = torch.zeros((self.graph_rows, columns), dtype=torch.long, device=self.device)
            if use_graphs:
                self.graphs = GraphCache(self._body, no_snapshot, no_restore)

    def align(self, jobs: Sequence[AlignJob]) -> list[Alignment]:
        """`align_async`, waited for."""
        return self.align_async(jobs).results()

    @torch.inference_mode()
    def align_async(self, jobs: Sequence[AlignJob], max_jobs: int = 16, max_rows: int = 2048) -> AlignPass:
        """For each finished sequence whose slot still holds its cross-attention keys/values: one
        teacher-forced pass over alignment prompt + text + end-of-text, queued on the engine's stream with the
        copies of its results to the host; nothing waits for the device. The slots may be reassigned at once:
        what is queued after the pass on this stream (an admission's cross keys/values) runs after it."""
        # Chunks of at most `max_jobs` windows and `max_rows` text tokens: eagerly each chunk is ~150 launched
        # kernels (~7-10 ms of this thread on an H100) whatever its size, a dozen where an alignment graph takes
        # it; its text-token logits take ~10 bytes × vocabulary a token at the peak (~1 GB at 2048 rows of 51,866).
        # Windows an alignment graph takes (batched mode's) go first, in chunks of its rows; the others (sequential
        # mode's, which need the raw scores) keep eager chunks of `max_jobs`: cut to the graphs' rows, 16 of them
        # were 4 eager passes instead of one. Results come back in the jobs' order.
        fits = [self._fits(job) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: not fits[i])  # stable
        chunks: list[list[AlignJob]] = []
        graphed: list[bool] = []  # per chunk: whether an alignment graph takes it (all its windows fit one)
        rows = 0
        for i in order:
            job, limit = jobs[i], min(max_jobs, self.graph_rows) if fits[i] else max_jobs
            if not chunks or graphed[-1] != fits[i] or len(chunks[-1]) >= limit or rows + len(job.text) > max_rows:
                chunks.append([])
                graphed.append(fits[i])
                rows = 0
            chunks[-1].append(job)
            rows += len(job.text)
        builders = [self._chunk(chunk, g) for chunk, g in zip(chunks, graphed, strict=True)]
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return AlignPass(done, builders, None if order == list(range(len(jobs))) else order)

    def _chunk(self, jobs: Sequence[AlignJob], graphed: bool) -> Callable[[], list[Alignment]]:
        """Queue one pass over `jobs`, through their alignment graph if `graphed`; returns what builds their
        results from the host copies."""
        eot = self.ids.eot
        sequences = [[*job.prompt, *job.text, eot] for job in jobs]
        chosen = [i for i, job in enumerate(jobs) if job.frames is not None]
        raw = [i for i, job in enumerate(jobs) if job.frames is None]
        raw_scores: Tensor | None = None
        stacked: Tensor | None
        if graphed:
            hidden, stacked = self._padded(jobs, sequences)
        else:
            width = max(len(seq) for seq in sequences)
            # one host→device copy: the right-padded tokens, each row's slot in a last column
            packed = to_device(
                [seq + [eot] * (width - len(seq)) + [job.slot] for seq, job in zip(sequences, jobs, strict=True)],
                torch.long,
                self.device,
            )
            heads = self.heads
            hidden, scores = self.model.decoder.align(packed[:, :width], self.cache, packed[:, width], heads)
            stacked = self._cost_matrices(scores, jobs, chosen)
            # the others' scores [B, heads, T, A] as float16: half the bytes; turned to float32 by the word timing
            # (a worker, not this thread, which feeds the GPU)
            raw_scores = scores[to_device(raw, torch.long, self.device)].half() if raw else None
        # each text token's probability, in one logits pass over every job's rows: position j predicts token j+1,
        # so job i's text is predicted from positions len(prompt)-1 onwards
        picked = [(i, len(job.prompt) - 1 + k, token) for i, job in enumerate(jobs) for k, token in enumerate(job.text)]
        probs = torch.zeros(0, device=self.device)
        if picked:
            index = to_device(picked, torch.long, self.device).T  # [3, N]: job, position, token
            logits = self.model.decoder.logits(hidden[index[0], index[1]][:, None])[:, 0, :eot]  # [N, eot]
            probs = logits.softmax(dim=-1).gather(1, index[2][:, None])[:, 0]
        host_probs, host_matrices, host_raw = queue_to_host(probs, stacked, raw_scores)

        def build() -> list[Alignment]:
            probs_list = cast(Tensor, host_probs).tolist()
            results, offset = [], 0
            for i, job in enumerate(jobs):
                matrix = scores_i = None
                if job.frames is not None:
                    matrix = cast(Tensor, host_matrices)[chosen.index(i), : len(job.text) + 1, : job.frames]
                else:
                    scores_i = cast(Tensor, host_raw)[raw.index(i), :, : len(sequences[i])]
                results.append(
                    Alignment(
                        scores=scores_i,
                        text_probs=tuple(probs_list[offset : offset + len(job.text)]),
                        text_tokens=job.text,
                        prompt_len=len(job.prompt),
                        matrix=matrix,
                    )
                )
                offset += len(job.text)
            return results

        return build

    def _fits(self, job: AlignJob) -> bool:
        """Whether an alignment graph can take this window: it has its frames (batched mode's; sequential mode's
        word timing reads the scores), the graphs' prompt length, and prompt + text + end-of-text fit its width."""
        return (
            self.graph_rows > 0
            and job.frames is not None
            and len(job.prompt) == self.prompt_len
            and len(job.prompt) + len(job.text) + 1 <= ALIGN_GRAPH_WIDTH
        )

    def _padded(self, jobs: Sequence[AlignJob], sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """The pass through the static inputs of its (rows, width) alignment graph: hidden states [n, width, D]
        and the cost matrices [n, max text + 1, max frames] (views of the graph's outputs, valid until its
        next replay, which the stream orders after the copies queued behind this pass)."""
        n, eot, full = len(jobs), self.ids.eot, ALIGN_GRAPH_WIDTH
        rows = padded_rows(n, self.graph_rows)
        width = -(-max(len(seq) for seq in sequences) // ALIGN_WIDTH_STEP) * ALIGN_WIDTH_STEP
        packed = [
            [*seq, *[eot] * (full - len(seq)), job.slot, len(seq), cast(int, job.frames)]
            for seq, job in zip(sequences, jobs, strict=True)
        ]
        packed += [packed[-1]] * (rows - n)
        self._ints[:rows].copy_(to_device(packed, torch.long, self.device))
        key: AlignKey = (rows, width)
        hidden, cost = self.graphs.run(key) if self.graphs is not None else self._body(key)
        texts = max(len(job.text) for job in jobs)
        frames = max(cast(int, job.frames) for job in jobs)
        return hidden[:n], cost[:n, : texts + 1, :frames]

    def _body(self, key: Hashable) -> tuple[Tensor, Tensor]:
        """An alignment graph's work: hidden states [R, W, D] and cost matrices [R, W - prompt, A] float32."""
        rows, width = cast(AlignKey, key)
        ints = self._ints[:rows]
        tokens, slots, sizes = ints[:, :width], ints[:, ALIGN_GRAPH_WIDTH], ints[:, ALIGN_GRAPH_WIDTH + 1 :]
        hidden, scores = self.model.decoder.align(tokens, self.cache, slots, self.heads)
        frames = self.model.dims.n_audio_ctx
        return hidden, padded_cost_matrices(scores, self.prompt_len, sizes, width, frames)

    def _cost_matrices(self, scores: Tensor, jobs: Sequence[AlignJob], chosen: list[int]) -> Tensor | None:
        """DTW cost matrices of the `chosen` jobs (those that gave their frames), made on the device for all of
        them at once: [len(chosen), max text + 1, max frames], job k's in [k, : len(text) + 1, : frames]."""
        if not chosen:
            return None
        prompt_len = len(jobs[chosen[0]].prompt)
        texts = [len(jobs[i].text) for i in chosen]
        frames = [cast(int, jobs[i].frames) for i in chosen]
        if any(len(jobs[i].prompt) != prompt_len for i in chosen):  # one alignment prompt length per call
            parts = [
                cost_matrices(scores[i : i + 1], len(jobs[i].prompt), [texts[k]], [frames[k]])
                for k, i in enumerate(chosen)
            ]
            out = parts[0].new_zeros(len(chosen), max(texts) + 1, max(frames))
            for k, part in enumerate(parts):
                out[k, : part.shape[1], : part.shape[2]] = part[0]
            return out
        if chosen == list(range(chosen[0], chosen[-1] + 1)):
            picked = scores[chosen[0] : chosen[-1] + 1]  # a slice: no index to copy up
        else:
            picked = scores[to_device(chosen, torch.long, self.device)]
        return cost_matrices(picked, prompt_len, texts, frames)

    def warm_up(self) -> int:
        """Capture every alignment graph before serving; returns how many there are."""
        if self.graphs is None:
            return 0
        self._ints.zero_()  # slot 0's cross keys/values, token 0: any values do for a capture
        self._ints[:, ALIGN_GRAPH_WIDTH + 1 :] = 1
        # largest first, so that each later capture fits in blocks the earlier ones freed in the shared pool
        # (smallest first, with 8 rows and the normalisation out of place, turbo's pool held 5.5 GB; largest
        # first, 4 rows and in place, 0.93 GB: bench/gpu_align_graphs.py on an H100)
        for n in reversed(padded_row_buckets(self.graph_rows)):
            for width in range(ALIGN_GRAPH_WIDTH, 0, -ALIGN_WIDTH_STEP):
                self.graphs.capture((n, width))
        return len(self.graphs)
