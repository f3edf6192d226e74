"""A token's raw bytes: read from the tokenizer's vocabulary, so that tokens splitting a character say
which bytes they hold (their own text is U+FFFD)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from kubelm_contract.protocol import TokenLogprob
from kubelm_runtime.serve import token_bytes
from kubelm_runtime.serve.openai_api import chat_logprobs, completion_logprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("text", ["日本 🙂", "naïve café", "plain words"])
def test_a_byte_level_vocabulary_gives_each_tokens_bytes_and_together_the_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    read = token_bytes.reader(tokenizer)
    pieces = [read(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    if not text.isascii():  # some token holds part of a character: its text alone cannot say which
        assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)


def test_byte_fallback_pieces_and_other_vocabularies() -> None:
    pieces = {1: "<0xE2>", 2: "▁the"}
    sentencepiece = SimpleNamespace(convert_ids_to_tokens=pieces.get, decode=lambda ids: {2: " the"}[ids[0]],
                                    backend_tokenizer=SimpleNamespace(decoder=object()))
    read = token_bytes.reader(sentencepiece)
    assert read(1) == b"\xe2" and read(2) == b" the"


def test_offsets_count_whole_characters_and_chat_shows_the_bytes() -> None:
    # 日 is e6 97 a5: split over two tokens, both start at it; the next starts one character later.
    tokens = (TokenLogprob("\ufffd", -1.0, token_bytes=(0xE6, 0x97)), TokenLogprob("\ufffd", -2.0, token_bytes=(0xA5,)),
              TokenLogprob("x", -0.5, (("y", -1.5),), token_bytes=(0x78,), top_bytes=((0x79,),)))
    found = completion_logprobs(tokens)
    assert found is not None and found["text_offset"] == [0, 0, 1]
    later = completion_logprobs(tokens[2:], before=tokens[:2])  # streamed after the first two
    assert later is not None and later["text_offset"] == [1]
    chat = chat_logprobs(tokens)
    assert chat is not None and [c["bytes"] for c in chat["content"]] == [[0xE6, 0x97], [0xA5], [0x78]]
    assert chat["content"][2]["top_logprobs"] == [{"token": "y", "logprob": -1.5, "bytes": [0x79]}]
    # A worker from before the field: the text's own bytes.
    assert chat_logprobs((TokenLogprob("é", -1.0),))["content"][0]["bytes"] == [0xC3, 0xA9]  # type: ignore[index]
