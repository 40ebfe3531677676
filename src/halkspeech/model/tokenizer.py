"""Whisper's tokenizer (tiktoken byte-pair encoding) and its token protocol: special tokens, languages, tasks,
timestamps. Everything above the model asks this module for token ids; nobody else assembles special tokens."""

from __future__ import annotations

import base64
import string
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from typing import Literal

import tiktoken

from halkspeech.model.dims import ModelDims
from halkspeech.model.languages import LANGUAGES, NO_SPACE_LANGUAGES, normalize_language

Task = Literal["transcribe", "translate"]

# GPT-2's pre-tokenisation pattern, as used by Whisper.
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_TIMESTAMPS = 1501  # <|0.00|> … <|30.00|> in 0.02 s steps
#: A prompt's characters tokenized at most, its end (Tokenizer.encode_prompt): far more than the 223 tokens a
#: decoder keeps of it take.
PROMPT_CHARS = 16_384


@cache
def _encoding(name: str, num_languages: int) -> tiktoken.Encoding:
    text = resources.files("halkspeech.model").joinpath("assets", f"{name}.tiktoken").read_text()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)],
    ]
    special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
    return tiktoken.Encoding(
        name=f"{name}-{num_languages}",
        explicit_n_vocab=len(ranks) + len(specials),
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


@dataclass(frozen=True)
class Tokenizer:
    """Text ↔ token ids for one vocabulary (English-only or multilingual with `num_languages` languages)."""

    multilingual: bool
    num_languages: int

    @classmethod
    def for_model(cls, dims: ModelDims) -> Tokenizer:
        return cls(multilingual=dims.is_multilingual, num_languages=dims.num_languages)

    def language(self, asked: str | None) -> str | None:
        """The language to decode in for `asked` (a code or name; None: detect it), refused with InvalidRequest
        if unknown or outside this vocabulary. An English-only model transcribes English whatever is asked."""
        if not self.multilingual:
            normalize_language(asked)  # still a known language, or a clear error
            return "en"
        return normalize_language(asked, self.num_languages)

    @cached_property
    def encoding(self) -> tiktoken.Encoding:
        return _encoding("multilingual" if self.multilingual else "gpt2", self.num_languages)

    @cached_property
    def _special(self) -> dict[str, int]:
        return {token: self.encoding.encode_single_token(token) for token in self.encoding.special_tokens_set}

    # --- special tokens -------------------------------------------------------------------------------
    @cached_property
    def eot(self) -> int:
        return self._special["<|endoftext|>"]

    @cached_property
    def sot(self) -> int:
        return self._special["<|startoftranscript|>"]

    @cached_property
    def sot_prev(self) -> int:
        return self._special["<|startofprev|>"]

    @cached_property
    def sot_lm(self) -> int:
        return self._special["<|startoflm|>"]

    @cached_property
    def transcribe(self) -> int:
        return self._special["<|transcribe|>"]

    @cached_property
    def translate(self) -> int:
        return self._special["<|translate|>"]

    @cached_property
    def no_speech(self) -> int:
        return self._special["<|nospeech|>"]

    @cached_property
    def no_timestamps(self) -> int:
        return self._special["<|notimestamps|>"]

    @cached_property
    def timestamp_begin(self) -> int:
        return self._special["<|0.00|>"]

    @cached_property
    def language_codes(self) -> tuple[str, ...]:
        return tuple(LANGUAGES)[: self.num_languages] if self.multilingual else ()

    @cached_property
    def language_tokens(self) -> tuple[int, ...]:
        """Ids of <|en|>, <|zh|>, … in vocabulary order (empty for English-only models)."""
        return tuple(self.sot + 1 + i for i in range(len(self.language_codes)))

    def language_token(self, code: str) -> int:
        return self.sot + 1 + self.language_codes.index(code)

    # --- sequences ------------------------------------------------------------------------------------
    def sot_sequence(self, language: str | None, task: Task, *, timestamps: bool = True) -> tuple[int, ...]:
        """`<|startoftranscript|><|xx|><|task|>` (just `<|startoftranscript|>` for English-only models),
        plus `<|notimestamps|>` when timestamps are off. `language=None` leaves the language slot out."""
        seq = [self.sot]
        if self.multilingual:
            if language is not None:
                seq.append(self.language_token(language))
            seq.append(self.transcribe if task == "transcribe" else self.translate)
        if not timestamps:
            seq.append(self.no_timestamps)
        return tuple(seq)

    def decoder_prompt(
        self,
        language: str | None,
        task: Task,
        *,
        timestamps: bool = True,
        previous: list[int] | tuple[int, ...] = (),
        prefix: list[int] | tuple[int, ...] = (),
        n_text_ctx: int = 448,
    ) -> tuple[tuple[int, ...], int]:
        """The decoder's initial tokens and the index of <|startoftranscript|> in them:
        `<|startofprev|> previous… <|startoftranscript|><|xx|><|task|>[<|notimestamps|>] prefix…`.

        `previous` keeps its last n_text_ctx/2 - 1 tokens; the sampled text gets the other half, of which
        `prefix` keeps its last ones that leave room for a token (a client's 460-token prefix overflowed the
        context)."""
        head: list[int] = []
        if previous:
            head = [self.sot_prev, *list(previous)[-(n_text_ctx // 2 - 1) :]]
        sot = list(self.sot_sequence(language, task, timestamps=timestamps))
        room = max(0, n_text_ctx // 2 - len(sot) - 1)
        tokens = head + sot + (list(prefix)[-room:] if room else [])
        return tuple(tokens), len(head)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's tokens, `encode(" " + text.strip())`, of no more than its last PROMPT_CHARS characters: a
        decoder keeps a prompt's last n_text_ctx/2 - 1 tokens (223), and tokenizing a client's 1 MB prompt held
        the event loop 0.19 s (its last 16,384 characters: 1.4 ms). A long text is cut at a space before a word,
        where the tokenizer's pieces start, so the tokens from there on are those of the whole text."""
        text = text.strip()
        if len(text) <= PROMPT_CHARS:
            return self.encode(" " + text)
        tail = text[-PROMPT_CHARS:]
        starts = (i for i in range(len(tail) - 1) if tail[i].isspace() and not tail[i + 1].isspace())
        return self.encode(tail[next(starts, 0) :])

    def encode(self, text: str) -> list[int]:
        """Plain text → tokens. Text that spells a special token (`<|endoftext|>`, `<|en|>`) is encoded as the
        characters it is, never as the control token: prompts and prefixes come from clients."""
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, tokens: list[int]) -> str:
        """Text of the tokens, special and timestamp tokens dropped: at a high temperature a language token can
        be sampled mid-text, and a transcript's text must be its segments' (which drop them too)."""
        return self.encoding.decode([t for t in tokens if t < self.eot])

    def decode_with_timestamps(self, tokens: list[int]) -> str:
        return self.encoding.decode(tokens)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens that are symbols or speaker tags, not speech: suppressed by default (suppress_tokens "-1").

        The same set as the reference: single-token symbols with or without a leading space, plus the first
        token of the musical-note symbols, plus " -" and " '"."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += [
            "<<",
            ">>",
            "<<<",
            ">>>",
            "--",
            "---",
            "-(",
            "-[",
            "('",
            '("',
            "((",
            "))",
            "(((",
            ")))",
            "[[",
            "]]",
            "{{",
            "}}",
            "♪♪",
            "♪♪♪",
        ]
        notes = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(notes):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in notes:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def suppress_tokens(self, spec: tuple[int, ...] = (-1,)) -> tuple[int, ...]:
        """The suppressed set for a request: `-1` expands to the non-speech symbols; the task, start and
        no-speech tokens are always suppressed (the no-speech probability is read separately)."""
        chosen = {t for t in spec if t >= 0}
        if -1 in spec:
            chosen.update(self.non_speech_tokens)
        chosen.update({self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech})
        return tuple(sorted(chosen))

    # --- words ----------------------------------------------------------------------------------------
    def split_to_words(self, tokens: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
        """Group text tokens into words: by whole Unicode characters for languages written without spaces,
        else by leading spaces and punctuation."""
        pieces, piece_tokens = self._split_on_unicode(tokens)
        if language in NO_SPACE_LANGUAGES:
            return pieces, piece_tokens
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for piece, group in zip(pieces, piece_tokens, strict=True):
            # An apostrophe right after a letter stays in its word: Turkish suffixes ("Ankara'ya", "Türkiye'nin")
            # and names ("O'Brien") were cut in two, where English contractions ("don't") are one token anyway.
            # (openai-whisper cuts them; it would time "'ya" as a word of its own.)
            inner = piece == "'" and bool(words) and words[-1][-1:].isalpha()
            punctuation = piece.strip() in string.punctuation and not inner
            starts_word = group[0] >= self.eot or piece.startswith(" ") or punctuation
            if starts_word or not words:
                words.append(piece)
                word_tokens.append(list(group))
            else:
                words[-1] += piece
                word_tokens[-1].extend(group)
        return words, word_tokens

    def _split_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Cut wherever the tokens so far decode to whole characters (no U+FFFD that the full text lacks)."""
        full = self.decode_with_timestamps(tokens)
        pieces: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for token in tokens:
            current.append(token)
            text = self.decode_with_timestamps(current)
            bad = text.find("\ufffd")
            if bad < 0 or full[offset + bad] == "\ufffd":
                pieces.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return pieces, groups
