"""`halkspeech loadtest http|ws`: bad options are one-line errors before any client starts (the end-to-end
runs against a live server are in tests/api/test_simple.py and tests/api/test_ws.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TEST_DATA
from halkspeech.cli import main

JFK = str(TEST_DATA / "jfk.flac")


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
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--turn-timeout-s", "-1"], "must be positive"),
        (["ws", "--url", "http://127.0.0.1:1/ws", "--audio", JFK], "--url must be a ws:// or wss:// URL"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--users", "0"], "at least 1"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--frame-ms", "1"], "--frame-ms between 5 and 1000"),
        # --json is checked before the run, not when its results are written at the end
        (["http", "--url", "http://127.0.0.1:1", "--audio", JFK, "--json", "/proc/nope/r.json"], "cannot write there"),
        (["ws", "--url", "ws://127.0.0.1:1/ws", "--audio", JFK, "--json", str(TEST_DATA)], "--json"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("halkspeech: error: ") and err.count("\n") == 1, err
    assert says in err, err


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
