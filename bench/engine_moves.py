"""Host time of a compaction (the scheduler's slot moves, applied by the runner before a step) with and without a
thread holding the GIL, as the server's request threads do under load.

A torch call gives up the GIL; winning it back while another thread runs Python waits up to the switch interval
(the engine sets 0.5 ms). Compaction used nine calls a moved slot (`per_move` below, the code before session 33);
`Runner._apply_moves` now makes a few for the whole compaction. The caches here have tiny.en's shape with 64 audio
frames, so that the copies themselves (on a GPU, queued and not waited for) take little of the time on a CPU.

    python bench/engine_moves.py [--moves 8,32] [--repeat 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from halkspeech.bench.common import device_info, median, print_table, write_json
from halkspeech.engine.batch import SlotMove
from halkspeech.engine.runner import Runner
from halkspeech.engine.sampling import SlotState
from halkspeech.model.cache import KVCache
from halkspeech.model.dims import KNOWN_DIMS

SLOTS = 64
SWITCH_S = 0.0005  # the engine's default (engine.gil_switch_ms)


def per_move(runner: SimpleNamespace, moves: tuple[SlotMove, ...]) -> None:
    """The code before session 33: nine torch calls a move."""
    cache, state = runner.cache, runner.state
    for move in moves:
        length = move.position + 1
        cache.self_kv[:, move.dest, :length] = cache.self_kv[:, move.source, :length]
        cache.cross_k[:, move.dest] = cache.cross_k[:, move.source]
        cache.cross_v[:, move.dest] = cache.cross_v[:, move.source]
        cache.cross_e[move.dest] = cache.cross_e[move.source]
        for tensor in state.tensors():
            tensor[move.dest] = tensor[move.source]
        state.active[move.source] = False


def batched(runner: SimpleNamespace, moves: tuple[SlotMove, ...]) -> None:
    Runner._apply_moves(runner, moves)  # type: ignore[arg-type]  # it reads only cache, state and device


def time_ms(
    apply: Callable[[SimpleNamespace, tuple[SlotMove, ...]], None],
    runner: SimpleNamespace,
    moves: tuple[SlotMove, ...],
    repeat: int,
) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        apply(runner, moves)
        times.append((time.perf_counter() - began) * 1000)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", default="8,32", help="moves in one compaction, comma-separated")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    counts = [int(n) for n in args.moves.split(",")]
    if not counts or min(counts) < 1 or max(counts) > SLOTS // 2 or args.repeat < 1:
        parser.error(f"--moves takes 1 to {SLOTS // 2} moves; --repeat at least 1")
    torch.set_num_threads(1)
    dims = dataclasses.replace(KNOWN_DIMS["tiny.en"], n_audio_ctx=64)
    runner = SimpleNamespace(
        cache=KVCache.allocate(dims, SLOTS, dtype=torch.float16, device="cpu", audio=True),
        state=SlotState.allocate(SLOTS, dims.n_vocab, "cpu"),
        device=torch.device("cpu"),
    )
    sys.setswitchinterval(SWITCH_S)
    stop = threading.Event()

    def hold_the_gil() -> None:  # pure Python, as a request thread parsing an upload
        n = 0
        while not stop.is_set():
            n += 1

    rows = []
    for contended in (False, True):
        holder = threading.Thread(target=hold_the_gil, daemon=True) if contended else None
        if holder:
            holder.start()
        for count in counts:
            moves = tuple(SlotMove(SLOTS - 1 - i, i, 40) for i in range(count))
            row = {"gil_held_by_another_thread": contended, "moves": count}
            for name, apply in (("per_move_ms", per_move), ("batched_ms", batched)):
                row[name] = round(time_ms(apply, runner, moves, args.repeat), 3)
            rows.append(row)
        if holder:
            stop.set()
            holder.join()
    columns = [("gil_held_by_another_thread", "GIL held by another thread"), ("moves", "moves"),
               ("per_move_ms", "nine calls a move, ms"), ("batched_ms", "a few calls in all, ms")]  # fmt: skip
    print_table(rows, columns, title=f"A compaction's host time, median of {args.repeat} (switch interval 0.5 ms)")
    if args.json_path:
        write_json(args.json_path, {"device": device_info(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
