"""The tokenizer on client text: a long prompt is tokenized by its end, with the tokens the whole text gives there;
and on decoded tokens: text without special tokens."""

from __future__ import annotations

from halkspeech.model.dims import KNOWN_DIMS
from halkspeech.model.tokenizer import PROMPT_CHARS, Tokenizer

TOKENIZER = Tokenizer.for_model(KNOWN_DIMS["large-v3"])
KEPT = KNOWN_DIMS["large-v3"].n_text_ctx // 2 - 1  # a prompt's tokens a decoder keeps (Tokenizer.decoder_prompt)


def test_a_long_prompt_gives_the_end_of_the_whole_texts_tokens() -> None:
    # words, punctuation, digits, a newline and a run of spaces: the tokenizer's pieces start at a space or after it
    words = "Ankara, İzmir: the 3rd of May,\n  naïve café — 2,500 kişi geldi! "
    text = words * (3 * PROMPT_CHARS // len(words))
    whole = TOKENIZER.encode(" " + text.strip())
    end = TOKENIZER.encode_prompt(text)
    assert KEPT < len(end) < len(whole) / 2
    assert end == whole[-len(end) :]


def test_a_short_prompt_is_tokenized_whole_and_one_without_spaces_by_its_last_characters() -> None:
    assert TOKENIZER.encode_prompt("  hello world \n") == TOKENIZER.encode(" hello world")
    assert TOKENIZER.encode_prompt("x" * (2 * PROMPT_CHARS)) == TOKENIZER.encode("x" * PROMPT_CHARS)


def test_text_leaves_out_special_and_timestamp_tokens() -> None:
    """A language token sampled mid-text (temperature 5 on tiny gave `... stupid<|hy|>`) is not text."""
    hy = TOKENIZER.language_token("hy")
    assert TOKENIZER.eot < hy < TOKENIZER.timestamp_begin
    tokens = [*TOKENIZER.encode(" hello"), hy, TOKENIZER.timestamp_begin + 50, *TOKENIZER.encode(" world")]
    assert TOKENIZER.decode([*tokens, TOKENIZER.eot]) == " hello world"
