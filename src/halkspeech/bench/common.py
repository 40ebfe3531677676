"""Shared benchmark plumbing: the device description, timing, tables and JSON output.

Benchmarks print a table and write JSON; tests never assert their numbers (DESIGN.md, "Measuring").
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from halkspeech.errors import InvalidRequest
from halkspeech.model.dims import KNOWN_DIMS

#: Forced decode lengths a benchmark may ask for: the decoder's context is 448 tokens, its prompt included.
MAX_FORCED_TOKENS = 440


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
        }
    else:
        info |= {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    return info


def cpu_name() -> str:
    """The CPU's model name where Linux gives it (platform.processor() is empty there), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_ranges(**options: tuple[float | Sequence[float] | None, float, float]) -> None:
    """Each keyword is a command-line option (`min_tokens` for --min-tokens) given as (value, lowest, highest);
    a sequence is checked item by item, None passes. Raises InvalidRequest naming every option out of range,
    so that a benchmark refuses bad input at once instead of failing, hanging or printing NaN later."""
    bad = []
    for name, (value, lowest, highest) in options.items():
        option = "--" + name.replace("_", "-")
        values = [] if value is None else list(value) if isinstance(value, Sequence) else [value]
        wrong = [v for v in values if not lowest <= v <= highest]
        if value is not None and not values:
            bad.append(f"{option} needs at least one value")
        elif wrong:
            limit = f"between {_num(lowest)} and {_num(highest)}"
            if highest == float("inf"):
                limit = f"at least {_num(lowest)}"
            bad.append(f"{option} must be {limit} (got {', '.join(map(_num, wrong))})")
    if bad:
        raise InvalidRequest("; ".join(bad))


def check_output(path: str | Path | None, option: str = "--json") -> None:
    """The results file can be written (its folders are made; a file made to try it is removed again). Checked
    before a run, so that a typo or a read-only place does not cost a long run's results."""
    if not path:
        return
    target = Path(path)
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a"):
            pass
    except OSError as exc:
        raise InvalidRequest(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        target.unlink(missing_ok=True)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_shapes(names: Sequence[str]) -> None:
    """Benchmarks with random weights take catalog shapes only (large-v3-turbo, large-v3, …)."""
    unknown = [n for n in names if n not in KNOWN_DIMS]
    if unknown or not names:
        raise InvalidRequest(
            f"unknown model shape {', '.join(map(repr, unknown)) or '(none given)'}: choose from "
            + ", ".join(sorted(KNOWN_DIMS))
        )


def free_device_memory(device: str | torch.device) -> None:
    """After a bench's engine or weights are dropped: collect them and give their cached blocks back to the
    device, for the next engine (or the server process started next)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` after `warmup` untimed calls, synchronised with the device on both sides."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q% of the values at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(round(q / 100 * len(ordered), 9))  # rounded first: 0.95 * 100 is 95.00000000000001
    return ordered[max(1, min(len(ordered), rank)) - 1]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, title: str = "") -> str:
    """Render rows as an aligned text table (columns: (key, header)); returns and prints it."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    text = (title + "\n" if title else "") + "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def cuda_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median device time of `fn` in ms (CUDA events around each call), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
