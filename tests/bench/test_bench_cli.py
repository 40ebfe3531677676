"""`halkspeech bench engine|mixed` end to end on the CPU with tiny.en's shape: both peers run, the table's
columns agree with each other, and bad options are one-line errors before anything loads. (Their timings are
for GPUs and are never asserted here.)"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TEST_DATA
from halkspeech.bench.hf_baseline import HFWhisper
from halkspeech.cli import main
from halkspeech.model.dims import ALIGNMENT_HEADS, KNOWN_DIMS, default_alignment_heads
from halkspeech.model.weights import random_weights

CPU = ["--device", "cpu", "--dtype", "float32"]


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, *CPU, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_engine_bench_runs_both_peers_and_its_columns_agree(tmp_path: Path) -> None:
    tokens = 2
    result = run_bench(tmp_path, "engine", "--models", "tiny.en", "--batches", "1,2", "--tokens", str(tokens),
                       "--repeats", "1")  # fmt: skip
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(e, b) for e in ("halkspeech", "hf-transformers") for b in (1, 2)}
    for (engine, batch), row in rows.items():
        assert row["windows_per_s"] == pytest.approx(batch / row["seconds"])
        assert row["tokens_per_s"] == pytest.approx(row["windows_per_s"] * tokens)
        assert row["rtfx"] == pytest.approx(row["windows_per_s"] * 30)
        if engine == "halkspeech":
            assert row["vs_hf"] == pytest.approx(rows["hf-transformers", batch]["seconds"] / row["seconds"])
    assert "tiny.en" in result["table"] and result["device"]["device"] == "cpu"


def test_a_batch_as_large_as_the_slots_decodes_in_one_round(tmp_path: Path) -> None:
    """The bench sizes the engine by its largest batch, and none of the slots is kept for live turns (the
    server keeps 4 of over 16): 17 windows in 17 slots take the tokens less the prefill's one in decode steps.
    With the reserve they took two rounds, the last 4 windows decoding alone."""
    tokens = 3
    result = run_bench(tmp_path, "engine", "--models", "tiny.en", "--batches", "17", "--tokens", str(tokens),
                       "--repeats", "1", "--no-hf")  # fmt: skip
    [row] = result["rows"]
    assert (row["batch"], row["slots"], row["decode_steps"]) == (17, 17, tokens - 1)


def test_the_hf_peer_gives_the_engine_the_catalogs_alignment_heads() -> None:
    """Both peers' weights carry the catalog's alignment heads, as without HF. The engine reserves GPU memory
    for word timing's graphs by the head: given OpenAI's fallback (every head of the decoder's second half, 320
    for large-v3's shape), large-v3 planned 24 decoder slots of an H100 instead of 160, and ran batch 64 in waves."""
    shared = HFWhisper("tiny.en", torch.device("cpu"), torch.float32).weights()
    alone = random_weights("tiny.en", dtype=torch.float32, device=torch.device("cpu"))
    assert shared.alignment_heads == alone.alignment_heads == ALIGNMENT_HEADS["tiny.en"]
    assert len(shared.alignment_heads) < len(default_alignment_heads(KNOWN_DIMS["tiny.en"]))


def test_mixed_bench_runs_every_batching_on_one_workload(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "mixed", "--models", "tiny.en", "--requests", "4", "--min-tokens", "2",
                       "--max-tokens", "6", "--slots", "2", "--modes", "continuous,static,static-padded",
                       "--rate", "1000000,50", "--encoder-wait-ms", "5")  # fmt: skip
    assert result["config"]["rates"] == [1000000, 50] and "encoder runs wait up to 5 ms" in result["table"]
    assert "| 1,000,000/s |" in result["table"] and "|        50/s |" in result["table"]
    by_rate = {(r["rate"], r["batching"]): r for r in result["rows"]}
    modes = ("continuous", "static", "static-padded")
    assert set(by_rate) == {(rate, mode) for rate in (1000000, 50) for mode in modes}
    # all at once (rate 0 spreads them over a second): every mode's batches are then the same, on a busy machine
    # too, where arrivals over a second fell into static batches of different sizes (17 against 20 steps)
    rows = {mode: r for (rate, mode), r in by_rate.items() if rate == 1000000}
    # the same requests and lengths in every mode: the same tokens decoded; static batching pads or drops
    # rows, but takes the same steps either way; continuous batching admits as slots free up (at 2 slots and
    # 2-6 tokens it may take a step more than static: a freed slot is seen a step late, as steps run ahead)
    decoded = {mode: round(r["mean_batch"] * r["steps"]) for mode, r in rows.items()}
    assert len(set(decoded.values())) == 1 and decoded["static"] > 0
    assert rows["static"]["steps"] == rows["static-padded"]["steps"]
    assert rows["continuous"]["admissions"] >= rows["static"]["admissions"]
    # each rate is a run of the same draws from the seed: the same lengths (tokens per window), arrival times
    # scaled by 1 / rate; its ratios are against the static runs at that rate
    for rate in (1000000, 50):
        continuous = by_rate[rate, "continuous"]
        assert continuous["vs_padded"] == pytest.approx(
            continuous["windows_per_s"] / by_rate[rate, "static-padded"]["windows_per_s"]
        )
        assert continuous["tokens_per_s"] / continuous["windows_per_s"] == pytest.approx(
            rows["static"]["tokens_per_s"] / rows["static"]["windows_per_s"]
        )
    assert by_rate[50, "static"]["arrivals_s"] == pytest.approx(rows["static"]["arrivals_s"] * 1000000 / 50)
    assert all(r["wall_s"] >= r["arrivals_s"] > 0 for r in result["rows"])  # none ends before its last arrival
    assert all(0 < r["p50_s"] <= r["p95_s"] for r in result["rows"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["engine", "--models", "nope"], "unknown model shape 'nope'"),
        (["engine", "--models", "tiny.en", "--batches", "0,2"], r"--batches must be between 1 and 4096 \(got 0\)"),
        (["engine", "--models", "tiny.en", "--tokens", "0", "--repeats", "0"], "--tokens .*; --repeats"),
        (["engine", "--models", "tiny.en", "--batches", ","], "--batches needs at least one value"),
        (["mixed", "--models", "tiny.en", "--requests", "0"], "--requests must be between 1 and"),
        (["mixed", "--models", "tiny.en", "--min-tokens", "5", "--max-tokens", "2"], "--max-tokens must be between 5"),
        (["mixed", "--models", "tiny.en", "--slots", "0"], "--slots must be"),  # it hung, waiting for a free slot
        (["mixed", "--models", "tiny.en", "--modes", "fast"], "unknown --modes fast"),
        (["mixed", "--models", "tiny.en", "--modes", "static,static"], "names a mode twice: use --repeats"),
        (["mixed", "--models", "tiny.en", "--repeats", "0"], "--repeats must be between 1 and 50"),
        (["mixed", "--models", "tiny.en", "--requests", "3", "--rate", "1e-300"], "keeps the arrivals within an"),
        (["mixed", "--models", "tiny.en", "--rate", "100,-1"], r"--rate must be at least 0 \(got -1\)"),
        (["mixed", "--models", "tiny.en", "--rate", "100,100"], "names a rate twice: use --repeats"),
        (["mixed", "--models", "tiny.en", "--encoder-wait-ms", "-1"], "--encoder-wait-ms must be between 0 and"),
        (["server", "--model", "tiny.en", "--concurrency", "0", "--clip-s", "40"], "--concurrency .*; --clip-s"),
        (["server", "--model", "tiny.en", "--warmup-requests", "0"], "--warmup-requests must be between 1"),
        (["ws", "--users", "0", "--turn-s", "0"], "--turn-s must be .*--users must be"),
        (["longform", "--minutes", "0"], "--minutes must be between 0.1 and 1440"),
        # no silent fall-back to the three test clips; a server that is down is found before the run, not after
        (["longform", "--dev-dir", "/nonexistent"], "--dev-dir /nonexistent: no manifest.jsonl there"),
        (["longform", "--url", "http://127.0.0.1:9"], "--url http://127.0.0.1:9: "),
        (["longform", "--url", "http://127.0.0.1:99999"], "--url http://127.0.0.1:99999: "),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args, *CPU]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halkspeech: error: ") and err.count("\n") == 1, err
    assert re.search(says, err), err


@pytest.mark.parametrize("kind", ["engine", "mixed", "server", "longform", "ws"])
def test_a_missing_gpu_or_a_cpu_float16_is_one_line(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every bench defaults to cuda: without one, a one-line error, not an assertion deep in torch; float16 on
    the CPU would run as float32 and be labelled float16, so it is refused too."""
    import torch

    runs = [["--device", "cpu", "--dtype", "float16"]]
    if not torch.cuda.is_available():
        runs.append([])
    for extra in runs:
        assert main(["bench", kind, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("halkspeech: error: ") and err.count("\n") == 1, err
        assert "no CUDA GPU" in err or "float16 does not run on the CPU" in err


@pytest.mark.parametrize(("concurrency", "requests", "processes"), [(4, 2, 4), (256, 1024, 4), (3, 7, 2), (1, 5, 8)])
def test_server_load_is_split_without_extra_requests(concurrency: int, requests: int, processes: int) -> None:
    from halkspeech.bench.server_bench import split_load
    from halkspeech.loadtest.http import HttpLoadConfig

    cfg = HttpLoadConfig(
        url="http://127.0.0.1:1", audio=(TEST_DATA / "jfk.flac",), concurrency=concurrency, requests=requests
    )
    parts = split_load(cfg, processes)
    assert sum(p.requests for p in parts) == requests and sum(p.concurrency for p in parts) == concurrency
    assert all(p.requests >= 1 and p.concurrency >= 1 for p in parts) and len(parts) <= processes
    assert all(p.rate is None for p in parts)
    opened = split_load(dataclasses.replace(cfg, rate=10.0), processes)  # open loop: the rate shared as requests
    assert sum(p.rate or 0 for p in opened) == pytest.approx(10.0) and len({p.seed for p in opened}) == len(opened)


def test_ws_bench_drives_the_protocol_asked_for() -> None:
    """`bench ws --protocol realtime` runs its scenarios through the load tester's realtime users (the run itself,
    a server in a subprocess, is too slow for a test: see README for the command)."""
    from halkspeech.bench.ws_bench import WsBenchConfig, _load

    for protocol in ("ws", "realtime"):
        cfg = WsBenchConfig(device="cpu", dtype="float32", protocol=protocol)  # type: ignore[arg-type]
        load = _load(cfg, "ws://127.0.0.1:1", TEST_DATA / "jfk.flac", users=2, turns=1, partials=True)
        assert load.protocol == protocol and load.partials
