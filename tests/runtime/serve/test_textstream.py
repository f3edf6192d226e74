"""What a row may stream while it is generated: whole characters, nothing a stop string would cut."""

from __future__ import annotations

from pathlib import Path

from kubelm_runtime.serve.textstream import streamable


def test_a_tail_that_may_become_a_stop_string_waits_and_a_found_stop_cuts() -> None:
    assert streamable("hello wor", ("world",)) == "hello "
    assert streamable("hello world and more", ("world",)) == "hello "
    assert streamable("hello w", ("xyz", "wz")) == "hello "
    assert streamable("hello", ("xyz",)) == "hello"
    assert streamable("a\n\n", ("\n\nEND",)) == "a"
    assert streamable("", ("stop",)) == ""


def test_characters_split_across_tokens_are_sent_whole(tiny_model: Path) -> None:
    """Byte-level BPE splits emoji and CJK characters across tokens; decoded alone, a partial one is
    U+FFFD. Streamed token by token, every piece is a prefix of the final text and none carries U+FFFD."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "tea 🍵 and 世界, café ☕!"
    tokens = tokenizer.encode(text)
    assert len(tokens) > len(text.split())  # the rare characters really span several tokens
    sent = ""
    for end in range(1, len(tokens) + 1):
        now = streamable(tokenizer.decode(tokens[:end]), ())
        assert now.startswith(sent) and "\ufffd" not in now
        sent = now
    assert sent == text
