"""Float flags refuse NaN and infinity as usage errors (exit 2, one line): each once slipped past a range check
and failed later (a wait of "nan s", an empty final, a traceback)."""

from __future__ import annotations

import argparse

import pytest

from halkspeech.cli import main
from halkspeech.cli.argtypes import finite_float


def test_finite_float() -> None:
    assert finite_float("0.5") == 0.5 and finite_float("-3") == -3.0
    for text in ("nan", "inf", "-inf", "1e999", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            finite_float(text)


@pytest.mark.parametrize(
    "args",
    [
        ["ws-client", "x.wav", "--timeout", "nan"],
        ["ws-client", "x.wav", "--speed", "nan"],
        ["ws-client", "x.wav", "--vad-threshold-db", "nan"],
        ["transcribe", "x.wav", "--patience", "inf"],
        ["loadtest", "ws", "--speed", "nan"],
        ["loadtest", "http", "--audio", "x.wav", "--timeout-s", "inf"],
        ["bench", "ws", "--turn-s", "nan"],
    ],
)
def test_non_finite_flags_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not a finite number" in err and "Traceback" not in err
