"""`halkspeech loadtest http|ws`: bad options are one-line errors before any client starts; `loadtest ws
--protocol realtime` against a real server with tiny.en (the /ws and http end-to-end runs are in
tests/api/test_ws.py and tests/api/test_simple.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.conftest import LiveServer, api_settings
from conftest import TEST_DATA
from halkspeech.cli import main
from halkspeech.engine.factory import ModelEngine
from halkspeech.loadtest import realtime_common as realtime
from halkspeech.loadtest import server_stats
from halkspeech.loadtest.ws import WsLoadConfig, failures, run_ws_load

JFK = str(TEST_DATA / "jfk.flac")
LJ_CLIP = TEST_DATA / "LJ001-0002.wav"  # 1.9 s: "in being comparatively modern."


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["http", "--url", "notaurl", "--audio", JFK], "--url must be an http:// or https:// URL: 'notaurl'"),
        (["http", "--url", "ftp://host/x", "--audio", JFK], "--url must be an http:// or https:// URL"),
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--concurrency", "0"], "at least 1"),
        (["http", "--url", "http://127.0.0.1:99999", "--audio", JFK], "--url needs a host and a port from 1 to"),
        (["http", "--url", "http://[::1", "--audio", JFK], "--url is not a valid URL: 'http://[::1'"),
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--timeout-s", "0"], "--timeout-s and --max-dur"),
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--max-duration-s", "-5"], "must be positive"),
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--rate", "0"], "--rate must be above 0"),
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--rate", "1e9"], "at most 100000 requests"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--turn-timeout-s", "-1"], "must be positive"),
        (["ws", "--url", "http://127.0.0.1:1/ws", "--audio", JFK], "--url must be a ws:// or wss:// URL"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--users", "0"], "at least 1"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--frame-ms", "1"], "--frame-ms between 5 and 1000"),
        # --json is checked before the run, not when its results are written at the end
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--json", "/proc/nope/r.json"], "cannot write there"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--json", str(TEST_DATA)], "--json"),
        (["ws", "--protocol", "realtime", "--url", "http://127.0.0.1:1", "--audio", JFK], "must be a ws:// or wss://"),
        (["ws", "--protocol", "realtime", "--url", "ws://127.0.0.1:99999", "--audio", JFK], "not a valid URL"),
        (["http", "--api", "triton-grpc", "--url", "ws://h:1", "--audio", JFK], "http://, https:// or grpc:// URL"),
        # which of the --audio files is not audio
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--audio", __file__], "test_loadtest.py: the input"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", __file__], "test_loadtest.py: the input is text"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halkspeech: error: ") and err.count("\n") == 1, err
    assert says in err, err


def test_the_grpc_load_goes_to_tritons_grpc_port_by_default(tmp_path: Path) -> None:
    """No --url: Triton's gRPC port on this machine (none listens here: every call fails UNAVAILABLE, exit 1)."""
    out = tmp_path / "grpc.json"
    args = ["loadtest", "http", "--api", "triton-grpc", "--audio", JFK, "--requests", "2", "--json", str(out)]
    assert main(args) == 1
    results = json.loads(out.read_text())
    assert results["config"]["endpoint"] == "localhost:8001" and results["errors"] == {"UNAVAILABLE": 2}


def test_json_check_leaves_no_file(tmp_path: Path) -> None:
    from halkspeech.bench.common import check_output

    target = tmp_path / "new" / "results.json"
    check_output(target)
    assert not target.exists() and target.parent.is_dir()


def test_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "bogus", "models", "list"])
    assert exit_.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


# -- loadtest ws --protocol realtime -----------------------------------------------------------------------


def test_realtime_urls_and_events_in_ws_words() -> None:
    assert realtime.realtime_url("ws://h:1") == "ws://h:1/v1/realtime?intent=transcription"
    assert realtime.realtime_url("http://h:1/v1/realtime?intent=x") == "ws://h:1/v1/realtime?intent=x"
    assert realtime.transcription_model(None, partials=False) == "whisper-1"
    assert realtime.transcription_model(None, partials=True) == "gpt-4o-transcribe"
    update = json.loads(realtime.session_update(model="whisper-1", language="en"))
    assert update["session"]["audio"]["input"] == {
        "format": {"type": "audio/pcm", "rate": 24000},  # what OpenAI's clients send
        "transcription": {"model": "whisper-1", "language": "en"},
        "turn_detection": None,
    }
    completed = {"type": realtime.PREFIX + "completed", "transcript": "hi", "usage": {"seconds": 1.5}}
    assert realtime.as_ws_message(completed, deltas=True) == {"type": "final", "text": "hi", "duration": 1.5}
    failed = {"type": realtime.PREFIX + "failed", "error": {"code": "overloaded", "message": "busy"}}
    assert realtime.as_ws_message(failed, deltas=True) == {"type": "error", "code": "overloaded", "message": "busy"}
    delta = {"type": realtime.PREFIX + "delta", "delta": "h"}
    assert realtime.as_ws_message(delta, deltas=True)["type"] == "partial"
    assert realtime.as_ws_message(delta, deltas=False)["type"] == "delta"  # whisper-1's one delta: not a partial


@pytest.fixture(scope="module")
def keyed_server(tiny_en_engine: ModelEngine) -> Iterator[LiveServer]:
    running = LiveServer(api_settings(api_keys=["s3cret"]), tiny_en_engine).start()
    yield running
    running.stop()


def realtime_load(server: LiveServer, **options: object) -> WsLoadConfig:
    url = server.url.replace("http://", "ws://")  # no path: the tester adds /v1/realtime?intent=transcription
    given: dict[str, object] = {"users": 2, "turns_per_session": 2, "speed": 4.0, "think_s": 0.0, "api_key": "s3cret"}
    return WsLoadConfig(url=url, audio=(LJ_CLIP,), protocol="realtime", **given | options)  # type: ignore[arg-type]


def test_realtime_load_times_commit_to_completed(keyed_server: LiveServer, tmp_path: Path) -> None:
    """2 users × 2 turns with deltas (gpt-4o-transcribe): every turn completes, each is timed, and each turn's
    deltas give a first-delta time (the last delta, with the rest of the transcript, comes at the latest)."""
    out = tmp_path / "load.json"
    results = run_ws_load(realtime_load(keyed_server, partials=True, json_path=str(out)))
    assert results["turns_ok"] == 4 and failures(results) == 0 and not results["errors"]
    assert results["dropped_connections"] == 0
    assert results["end_to_final_ms"]["count"] == 4 and results["end_to_final_ms"]["p50"] > 0
    assert results["first_partial_ms"]["count"] == 4 and results["partials"] >= 4
    assert results["partial_lag_ms"]["count"] == 0  # deltas say nothing of the audio they cover
    assert results["audio_s_per_s"] > 0  # from each completed's usage.seconds
    saved = json.loads(out.read_text())
    assert saved["config"]["protocol"] == "realtime" and saved["turns_ok"] == 4


@pytest.mark.parametrize(
    ("options", "code"),
    [({"api_key": "wrong"}, "invalid_api_key"), ({"model": "no-such-model"}, "model_not_found")],
)
def test_realtime_refusals_are_counted_by_code(keyed_server: LiveServer, options: dict[str, str], code: str) -> None:
    """A refused connection or session update fails that session's turns, counted under the server's code."""
    results = run_ws_load(realtime_load(keyed_server, **options))
    assert results["turns_ok"] == 0 and results["turns_failed"] == 4 and results["errors"] == {code: 2}
    assert list(results["error_messages"]) == [code]  # the server's first message of each code, as it said it
    assert len(results["error_messages"][code]) > 10 and results["error_messages"][code] != "None"
    assert results["users_failed"] == 0  # nothing crashed in the tester


def test_realtime_cli_says_failures_in_its_exit_code(
    keyed_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = keyed_server.url.replace("http://", "ws://")
    args = ["loadtest", "ws", "--protocol", "realtime", "--url", url, "--audio", str(LJ_CLIP), "--users", "1"]
    args += ["--turns-per-session", "1", "--speed", "0", "--think-s", "0"]
    assert main([*args, "--api-key", "s3cret"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Realtime API (/v1/realtime) load: 1 users") and "commit → completed (client)" in out
    assert main([*args, "--api-key", "wrong"]) == 1
    assert "errors {'invalid_api_key': 1}" in capsys.readouterr().out


def test_the_server_side_is_what_the_statistics_grew_by_or_why_there_is_none() -> None:
    """perf_analyzer's "Server:" arithmetic on two readings of Triton's statistics (the served path is in
    tests/api/test_triton.py)."""
    before = {"inference_count": 10, "execution_count": 5, "success": (5, 10**9), "fail": (1, 0)}
    before |= {phase: (5, 10**8) for phase in server_stats.PHASES}
    after = {"inference_count": 18, "execution_count": 9, "success": (9, 3 * 10**9), "fail": (2, 0)}
    after |= {"queue": (9, 5 * 10**8), "compute_input": (9, 10**8 + 4000), "compute_infer": (9, 10**9 + 10**8),
              "compute_output": (9, 10**8)}  # fmt: skip
    server = server_stats.difference(before, after)
    assert (server["requests"], server["failures"], server["inferences"], server["executions"]) == (4, 1, 8, 4)
    assert server["mean_ms"] == {"success": 500.0, "queue": 100.0, "compute_input": 0.001, "compute_infer": 250.0,
                                 "compute_output": 0.0}  # fmt: skip
    line = server_stats.describe(server)
    assert "4 requests, 1 failed" in line and "mean ms: 500.0 (queue 100.0, input 0.0, infer 250.0, output 0.0)" in line
    assert "mean_ms" not in server_stats.difference(before, before)  # no request: no mean
    gone = server_stats.difference(before, "HTTP 404: no such model")
    assert gone == {"unavailable": "HTTP 404: no such model"}
    assert server_stats.describe(gone) == "server statistics: unavailable (HTTP 404: no such model)"
