"""Batched generation on a tiny real model: per-request parameters, left padding, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubelm_contract.protocol import Decoding
from kubelm_runtime.serve.engine import Engine, Item


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine.load(str(tiny_model), dtype="fp32")


def test_greedy_batch_matches_transformers_generate_one_by_one(engine: Engine) -> None:
    prompts = ["the old fox", "two", "counting: one two three"]
    outputs = engine.generate([Item(p, Decoding(max_new_tokens=6 + i, temperature=0)) for i, p in enumerate(prompts)])
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        ids = engine.tokenizer(prompt, return_tensors="pt")
        reference = engine.model.generate(**ids, max_new_tokens=6 + i, do_sample=False,
                                          pad_token_id=engine.tokenizer.eos_token_id)
        expected = engine.tokenizer.decode(reference[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert output.text == expected
        assert output.prompt_tokens == ids["input_ids"].shape[1]
        if output.finish_reason == "length":
            assert output.completion_tokens == 6 + i


def test_seeded_sampling_does_not_depend_on_the_batch(engine: Engine) -> None:
    seeded = Item("the", Decoding(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=1234))
    alone = engine.generate([seeded])[0]
    in_batch = engine.generate([Item("a b c d e f", Decoding(temperature=0.5)), seeded,
                                Item("x", Decoding(max_new_tokens=3, temperature=0))])[1]
    assert alone == in_batch
    other_seed = engine.generate([Item("the", Decoding(max_new_tokens=10, temperature=1.0, seed=99))])[0]
    assert other_seed.completion_tokens > 0


def test_stop_sequences_cut_the_text(engine: Engine) -> None:
    free = engine.generate([Item("the", Decoding(max_new_tokens=12, temperature=0))])[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    stopped = engine.generate([Item("the", Decoding(max_new_tokens=12, temperature=0, stop=(stop,)))])[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert free.text.startswith(stopped.text)


def test_repetition_penalty_changes_greedy_output(engine: Engine) -> None:
    plain = engine.generate([Item("the the the", Decoding(max_new_tokens=12, temperature=0))])[0]
    penalised = engine.generate([Item("the the the", Decoding(max_new_tokens=12, temperature=0,
                                                              repetition_penalty=5.0))])[0]
    assert plain.text != penalised.text


def test_bf16_loads_when_asked(tiny_model: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="bf16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    output = engine.generate([Item("the", Decoding(max_new_tokens=4, temperature=0))])[0]
    assert output.prompt_tokens == 1 and output.completion_tokens <= 4
    assert output.finish_reason == ("length" if output.completion_tokens == 4 else "stop")
