"""Text files -> token ids on disk -> fixed-length blocks, deterministic per seed.

Documents are tokenized in batches and appended to a flat token file (uint16
when the vocabulary allows), separated by EOS, then memory-mapped: a corpus
larger than RAM works, and a restarted job reuses the file (keyed by a
fingerprint of the data, the tokenizer and the format).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

TOKENIZE_BATCH = 1000


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def iter_documents(path: Path, fmt: str, text_field: str) -> Iterator[str]:
    """Plain text: blank-line separated paragraphs, or one document per line when there are no blank lines.
    JSONL: one object per line with the text under `text_field`."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{number}: not valid JSON: {e}") from e
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no string field {text_field!r}")
                yield text
        return
    with open(path, encoding="utf-8") as fh:
        paragraphs = any(not line.strip() for line in fh)
    with open(path, encoding="utf-8") as fh:
        if not paragraphs:
            yield from (line.rstrip("\n") for line in fh if line.strip())
            return
        current: list[str] = []
        for line in fh:
            if line.strip():
                current.append(line.rstrip("\n"))
            elif current:
                yield "\n".join(current)
                current = []
        if current:
            yield "\n".join(current)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenFile:
    path: Path
    dtype: str
    tokens: int
    source_digest: str

    def array(self) -> np.ndarray:
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


def tokenize_file(source: Path, fmt: str, text_field: str, tokenizer: Any, cache_dir: Path) -> TokenFile:
    """Tokenizes `source` into `cache_dir` unless an identical token file is already there."""
    if not source.is_file():
        raise DataError(f"dataset file {source} does not exist")
    digest = file_digest(source)
    key = hashlib.sha256(f"{digest}|{tokenizer_fingerprint(tokenizer)}|{fmt}|{text_field}".encode()).hexdigest()[:24]
    out = cache_dir / f"{key}.tokens"
    meta_path = cache_dir / f"{key}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return TokenFile(out, meta["dtype"], meta["tokens"], digest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    tokens = 0
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        for batch in _batched(iter_documents(source, fmt, text_field), TOKENIZE_BATCH):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)
            fh.write(flat.tobytes())
            tokens += len(flat)
    os.replace(tmp, out)
    meta_path.write_text(json.dumps({"dtype": dtype, "tokens": tokens, "source": str(source), "digest": digest}))
    return TokenFile(out, dtype, tokens, digest)


class Blocks:
    """Non-overlapping windows of `length` tokens over a token file (the tail that does not fill one is dropped)."""

    def __init__(self, token_file: TokenFile, length: int):
        self.tokens = token_file.array()
        self.length = length
        self.count = len(self.tokens) // length

    def batch(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.tokens[i * self.length:(i + 1) * self.length] for i in indices]).astype(np.int64)


def epoch_order(blocks: int, seed: int, epoch: int, rank: int, world: int, batch_size: int) -> np.ndarray:
    """This rank's block indices for one epoch: a seeded shuffle, split evenly over ranks and
    cut to whole micro-batches, so every rank runs the same number of steps."""
    permutation = np.random.default_rng([seed, epoch]).permutation(blocks)
    per_rank = (blocks // world) // batch_size * batch_size
    return permutation[rank::world][:per_rank]


def eval_shard(blocks: int, rank: int, world: int) -> np.ndarray:
    return np.arange(blocks)[rank::world]
