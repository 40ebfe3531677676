"""`--help` says each flag's default (and, for `serve`, the setting the flag overrides)."""

from __future__ import annotations

import pytest

from halkspeech.cli import main


def help_of(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["serve"], "(server.max_concurrent_requests; default 256)"),
        (["serve"], "--port PORT port (server.port; default 8000)"),
        (["serve"], "(model.default; default base)"),
        (["bench", "engine"], "--batches BATCHES default: 1,16,64,256"),
        (["bench", "engine"], "--device {cuda,cpu} default: cuda"),
        (["loadtest", "ws"], "--language LANGUAGE default: en"),
        (["loadtest", "ws"], "--protocol {ws,realtime} ws: /ws push-to-talk; realtime: OpenAI's Realtime"),
        (["bench", "ws"], "--protocol {ws,realtime} ws: /ws push-to-talk; realtime: /v1/realtime"),
        (["loadtest", "ws"], "--ramp-s RAMP_S spread user starts over this many seconds (default: 0.0)"),
        (["ws-client"], "--frame-ms FRAME_MS PCM frame length (default: 20)"),  # said once, by the help itself
        (["models", "list"], "Every catalog model and anything else in the cache"),
    ],
)
def test_help_gives_defaults(capsys: pytest.CaptureFixture[str], command: list[str], says: str) -> None:
    assert says in help_of(capsys, *command)


def test_off_switch_has_no_default(capsys: pytest.CaptureFixture[str]) -> None:
    """A store_false flag's default is True, the setting it turns off: "--no-x (default: True)" read as "on"."""
    text = help_of(capsys, "transcribe")
    assert "before it (fewer repetition loops, less context; batched mode never does) --word-timestamps" in text
    assert "(default: True)" not in text
