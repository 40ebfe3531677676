"""CUDA graphs of the decode step, small encoder runs, admissions and alignment passes, one per shape key,
captured ahead of use.

At batch 1 a Whisper decode step is a few hundred small kernels; launched one by one from Python the launch
overhead, not the GPU, sets the pace (DESIGN.md: HF pays 0.19 s for one 30 s window on an H200). A graph
replays them with one launch. Shapes are static per key (batch bucket, window bucket, variant) because every
input already lives in persistent buffers (the slot state and the KV cache), so a replay needs no copies.
An encoder run is ~550 kernels: in a server, each launch from the engine thread gives up the GIL and must win
it back from the request threads, so eager runs are launched slower than the GPU runs them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

log = logging.getLogger(__name__)
Out = TypeVar("Out")
#: One capture at a time in the process: with one engine per GPU, two engine threads may capture at once
#: (graphs not captured at start, such as a sampling step's), and PyTorch's torch.cuda.graph empties every
#: device's allocator cache on entry and expects one capture underway per process.
_CAPTURING = threading.Lock()


class GraphCache(Generic[Out]):
    """Captures `body(key)` per key and replays it.

    `snapshot`/`restore` save and put back whatever the body mutates (the slot state), because the warm-up
    run that must precede a capture really executes and would otherwise advance live sequences."""

    def __init__(
        self,
        body: Callable[[Hashable], Out],
        snapshot: Callable[[], object],
        restore: Callable[[object], None],
    ) -> None:
        self.body = body
        self.snapshot = snapshot
        self.restore = restore
        self.pool = torch.cuda.graph_pool_handle()
        # Captured on a stream of its own: cuBLAS keeps one workspace per stream, and a graph keeps the workspace
        # of the stream it was captured on. On torch.cuda.graph's shared default capture stream, encoder graphs
        # replayed on the encoder stream and admission graphs on the engine's shared it while running at once,
        # and the engine hung in its first admission (H100, engine.encode_ahead; most likely a GEMM that keeps
        # counters in its workspace). With a capture stream per cache it has not hung since.
        self.capture_stream = torch.cuda.Stream()
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Out]] = {}

    def __len__(self) -> int:
        return len(self.graphs)

    def capture(self, key: Hashable) -> None:
        """Capture ahead of use (engine start), so no request waits for a capture."""
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)

    def run(self, key: Hashable) -> Out:
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def _capture(self, key: Hashable) -> tuple[torch.cuda.CUDAGraph, Out]:
        with _CAPTURING:
            return self._capture_alone(key)

    def _capture_alone(self, key: Hashable) -> tuple[torch.cuda.CUDAGraph, Out]:
        log.debug("capturing graph %s", key)
        saved = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(key)  # warm-up: lazy initialisation (cuBLAS handles, workspaces) must not be captured
        torch.cuda.current_stream().wait_stream(side)
        self.restore(saved)
        graph = torch.cuda.CUDAGraph()
        # thread_local: in a server, other threads keep launching CUDA work (log-mel of new requests) while
        # this thread captures; in the default "global" mode any of their calls invalidates the capture.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream, capture_error_mode="thread_local"):
            outputs = self.body(key)
        return graph, outputs


def padded_rows(n: int, limit: int) -> int:
    """Rows of the graph that takes n rows: the next power of two, at most `limit` (the rest repeat the last)."""
    return min(1 << (n - 1).bit_length(), limit)


def padded_row_buckets(limit: int) -> list[int]:
    """Every row count `padded_rows` gives for 1..limit rows, ascending: the graphs to capture."""
    return sorted({padded_rows(n, limit) for n in range(1, limit + 1)})


def no_snapshot() -> None:
    """For graphs whose warm-up run changes no state (encoder runs, admissions, alignment passes): a capture
    has nothing to save or put back."""


def no_restore(saved: object) -> None:
    """See no_snapshot."""
