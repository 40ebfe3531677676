"""Language values as clients send them: codes, names, locales and the aliases Whisper spells otherwise."""

from __future__ import annotations

import pytest

from halkspeech.errors import InvalidRequest
from halkspeech.model.languages import normalize_language


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("tr", "tr"),
        (" TR ", "tr"),
        ("Turkish", "tr"),
        ("TURKİSH", "tr"),  # typed on a Turkish keyboard: "İ".lower() is "i" with a combining dot
        ("tr-TR", "tr"),  # browser and OS locales: their language part
        ("pt_BR", "pt"),
        ("zh-Hans", "zh"),
        ("en-US", "en"),
        ("jv", "jw"),  # ISO 639-1 Javanese; Whisper's code is "jw"
        ("iw", "he"),  # Hebrew's old code (Java, Android)
        ("haw", "haw"),
        ("auto", None),
        ("", None),
    ],
)
def test_accepted_spellings(value: str, code: str | None) -> None:
    assert normalize_language(value) == code


def test_an_unknown_language_names_the_valid_codes_without_echoing_it_whole() -> None:
    with pytest.raises(InvalidRequest) as refused:
        normalize_language("klingon-" + "x" * 5000)
    message = str(refused.value)
    assert "'klingon-" in message and "x" * 100 not in message
    assert "the codes: en, zh, de" in message and ", tr," in message
