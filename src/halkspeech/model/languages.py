"""Whisper's languages, in vocabulary order (the i-th code is the i-th language token)."""

from __future__ import annotations

import re

from halkspeech.errors import InvalidRequest

# Order matters: language token ids are assigned in this order. The first 99 exist in every multilingual
# vocabulary; large-v3's adds Cantonese.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

_ALIASES = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}  # fmt: skip

TO_LANGUAGE_CODE: dict[str, str] = {name: code for code, name in LANGUAGES.items()} | _ALIASES

# Scripts written without spaces between words: word splitting goes by Unicode code points instead.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


#: Codes Whisper spells otherwise: ISO 639-1's Javanese, and Hebrew's old code (Java's and Android's locales).
_CODE_ALIASES = {"jv": "jw", "iw": "he"}
_REGION = re.compile(r"^([a-z]{2,3})[-_][a-z0-9]{2,8}$")  # a locale: "tr-TR", "pt_BR", "zh-Hans"


def language_key(text: str) -> str:
    """Lower case that folds Turkish capitals too: "İ".lower() is "i" plus a combining dot (U+0307), and "I"
    of "IŞIK" lowers to "i" where the word has "ı"; both fold to "i" here."""
    return text.lower().replace("\u0307", "").replace("ı", "i")


def normalize_language(value: str | None, num_languages: int = len(LANGUAGES)) -> str | None:
    """`"tr"`, `"Turkish"`, `"TR"`, `"tr-TR"` → `"tr"`; None, "" and "auto" mean detect. Unknown codes raise
    InvalidRequest, with the list of codes."""
    if value is None:
        return None
    key = language_key(value.strip())
    if key in ("", "auto", "none", "detect"):
        return None
    if (locale := _REGION.match(key)) is not None:  # a browser's or OS's locale: its language part
        key = locale.group(1)
    key = _CODE_ALIASES.get(key, key)
    code = key if key in LANGUAGES else TO_LANGUAGE_CODE.get(key)
    if code is None:
        shown = value if len(value) <= 40 else value[:40] + "..."  # never echo a client's megabyte back
        raise InvalidRequest(
            f"unsupported language {shown!r}: use an ISO 639-1 code such as 'en' or 'tr', or an English name "
            f"such as 'turkish'; the codes: {', '.join(list(LANGUAGES)[:num_languages])}",
            param="language",
        )
    if list(LANGUAGES).index(code) >= num_languages:
        raise InvalidRequest(f"language {code!r} is not in this model's vocabulary", param="language")
    return code
