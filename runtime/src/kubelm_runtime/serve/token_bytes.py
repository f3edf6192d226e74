"""A token's raw bytes, for log-probabilities: a token that holds part of a character decodes alone to
U+FFFD, so its text cannot say which bytes it adds (OpenAI's `bytes` field does)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""SentencePiece's pieces for single bytes (Llama, Mistral, ...)."""


def reader(tokenizer: Any) -> Callable[[int], bytes]:
    """token id -> its bytes: read from a byte-level vocabulary (GPT-2 and the BPE tokenizers built like
    it, whose pieces spell bytes as printable characters), from byte-fallback pieces, else the token's
    own text encoded."""

    def from_text(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        fallback = _BYTE_FALLBACK.fullmatch(piece) if isinstance(piece, str) else None
        return bytes([int(fallback[1], 16)]) if fallback else str(tokenizer.decode([token_id])).encode()

    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return from_text
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelt = {character: byte for byte, character in bytes_to_unicode().items()}

    def byte_level(token_id: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in spelt for c in piece):
            return bytes(spelt[c] for c in piece)
        return from_text(token_id)  # an added token outside the byte alphabet

    return byte_level
