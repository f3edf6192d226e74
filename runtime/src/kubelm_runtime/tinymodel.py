"""Tiny GPT-2 models built from a config, with a tokenizer trained on a local corpus.

Used by tests, benchmarks and the demo so nothing is downloaded: the result is a
normal save_pretrained directory that from_pretrained loads like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyShape:
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 256


def train_tokenizer(corpus: list[Path], vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in corpus], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
              show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             pad_token=EOS)


def build(out: Path, corpus: list[Path], shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Writes a randomly initialised GPT-2 of `shape` and its tokenizer to `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(corpus, shape.vocab_size)
    # The model's vocabulary may be padded beyond the tokenizer's (as GPT-2 shapes often are).
    config = GPT2Config(
        vocab_size=max(shape.vocab_size, len(tokenizer)), n_layer=shape.n_layer, n_head=shape.n_head,
        n_embd=shape.n_embd, n_positions=shape.n_positions, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
