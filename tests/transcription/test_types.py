"""TranscribeOptions refuses values no entry point could run, when it is made, naming the field."""

from __future__ import annotations

import math

import pytest

from halkspeech.errors import InvalidRequest
from halkspeech.transcription.types import TranscribeOptions


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"length_penalty": 2.0}, "length_penalty must be between 0 and 1, got 2.0"),
        ({"length_penalty": -0.1}, "length_penalty must be between 0 and 1"),
        ({"length_penalty": math.nan}, "length_penalty must be a finite number"),
        ({"patience": 0.0}, "patience must be above 0"),
        ({"best_of": 17}, "best_of must be between 1 and 16"),
        ({"max_initial_timestamp": 31.0}, "max_initial_timestamp must be 0 to 30 s"),
    ],
)
def test_bad_values_are_refused_when_made(fields: dict[str, float], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says.replace("(", r"\(")):
        TranscribeOptions(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("penalty", [None, 0.0, 0.6, 1.0])
def test_length_penalties_in_range_are_kept(penalty: float | None) -> None:
    assert TranscribeOptions(length_penalty=penalty).length_penalty == penalty
