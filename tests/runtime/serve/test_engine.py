"""Batched generation on a tiny real model: per-request parameters, left padding, stops."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubelm_contract.protocol import Decoding
from kubelm_runtime.cpu import cpu_has_fast_bf16
from kubelm_runtime.serve.engine import Batch, Engine, Item, Output, Row, end_tokens
from kubelm_runtime.serve.kvcache import GrowingCache, GrowingLayer, room_for


@pytest.fixture(scope="module", params=["lean", "transformers"])
def engine(tiny_model: Path, request: pytest.FixtureRequest) -> Engine:
    """Both forward passes: the lean GPT-2 one and transformers' (used for other architectures), each
    with its products packed for oneDNN where this CPU can (as a worker loads them)."""
    loaded = Engine.load(str(tiny_model), dtype="fp32", lean=request.param == "lean")
    assert (loaded.lean is not None) == (request.param == "lean")
    return loaded


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Engine:
    """transformers' model as it comes (nothing packed): what the engine's results are checked against."""
    return Engine.load(str(tiny_model), dtype="fp32", batch_hint=0, lean=False)


def test_greedy_batch_matches_transformers_generate_one_by_one(engine: Engine, reference: Engine) -> None:
    prompts = ["the old fox", "two", "counting: one two three"]
    outputs = engine.generate([Item(p, Decoding(max_new_tokens=6 + i, temperature=0)) for i, p in enumerate(prompts)])
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        ids = engine.tokenizer(prompt, return_tensors="pt")
        generated = reference.model.generate(**ids, max_new_tokens=6 + i, do_sample=False,
                                             pad_token_id=engine.tokenizer.eos_token_id)
        expected = engine.tokenizer.decode(generated[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert output.text == expected
        assert output.prompt_tokens == ids["input_ids"].shape[1]
        if output.finish_reason == "length":
            assert output.completion_tokens == 6 + i


def test_token_ids_given_with_an_item_are_used_as_they_are(engine: Engine) -> None:
    greedy = Decoding(max_new_tokens=8, temperature=0)
    ids = engine.encode("the old fox")
    assert ids and all(isinstance(i, int) for i in ids)
    # The worker encodes prompts once (length check) and hands the ids on: the text is then not read.
    given, encoded, other = engine.generate([Item("two", greedy, ids), Item("the old fox", greedy),
                                             Item("two", greedy)])
    assert given == encoded
    assert given.prompt_tokens == len(ids) != other.prompt_tokens


def test_seeded_sampling_does_not_depend_on_the_batch(engine: Engine) -> None:
    seeded = Item("the", Decoding(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=1234))
    alone = engine.generate([seeded])[0]
    in_batch = engine.generate([Item("a b c d e f", Decoding(temperature=0.5)), seeded,
                                Item("x", Decoding(max_new_tokens=3, temperature=0))])[1]
    assert alone == in_batch
    # The seed decides the sample: of a few other seeds, some give another text (a tiny model may
    # agree with one of them by chance, not with all).
    ends, engine.end_tokens = engine.end_tokens, frozenset()  # every row samples all 10 tokens
    try:
        texts = {engine.generate([Item("the", Decoding(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9,
                                                        seed=seed))])[0].text for seed in (1234, 99, 7, 2024)}
    finally:
        engine.end_tokens = ends
    assert len(texts) > 1


def test_stop_sequences_cut_the_text(engine: Engine) -> None:
    free = engine.generate([Item("the", Decoding(max_new_tokens=12, temperature=0))])[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    stopped = engine.generate([Item("the", Decoding(max_new_tokens=12, temperature=0, stop=(stop,)))])[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert free.text.startswith(stopped.text)


def test_a_stop_string_longer_than_32_tokens_is_seen_when_it_ends(engine: Engine) -> None:
    """The check between tokens decodes only a row's last tokens: enough of them for the longest stop."""
    text = "the quick brown fox jumps over the lazy dog and " * 6
    tokens = list(engine.encode(text))
    assert len(tokens) > 40
    assert engine._hit_stop(tokens, (text[1:],)) and not engine._hit_stop(tokens[:-1], (text[1:],))


def test_the_models_own_end_tokens_end_a_row_too() -> None:
    """Chat models often end a turn with a token of their generation config, not the tokenizer's EOS."""
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9])), tokenizer) == {2, 7, 9}
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5)), tokenizer) == {2, 5}
    assert end_tokens(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tokenizer) == {2}
    assert end_tokens(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == frozenset()


def test_presence_and_frequency_penalties_lower_the_generated_tokens_logits_as_openai_defines(
        engine: Engine) -> None:
    """logit - frequency * count - presence, for each token the row generated (the prompt's do not count)."""
    logits = torch.zeros(2, 6)
    decoding = Decoding(temperature=0, presence_penalty=0.5, frequency_penalty=1.5)
    rows = [Row("penalised", Item("x", decoding), prompt_ids=[4], generator=None, generated=[1, 1, 2]),
            Row("plain", Item("x", Decoding(temperature=0)), prompt_ids=[4], generator=None, generated=[1, 1, 2])]
    chosen = engine._select(Batch(rows=rows, logits=logits))
    assert logits[0].tolist() == [0.0, -3.5, -2.0, 0.0, 0.0, 0.0] and logits[1].tolist() == [0.0] * 6
    assert chosen.tolist() == [0, 0]


def test_a_frequency_penalty_changes_greedy_output(engine: Engine) -> None:
    plain = engine.generate([Item("the the the", Decoding(max_new_tokens=12, temperature=0))])[0]
    penalised = engine.generate([Item("the the the", Decoding(max_new_tokens=12, temperature=0,
                                                              frequency_penalty=2.0))])[0]
    assert plain.text != penalised.text


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


def greedy_reference(engine: Engine, prompt: str, tokens: int) -> str:
    ids = engine.tokenizer(prompt, return_tensors="pt")
    out = engine.model.generate(**ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens,
                                pad_token_id=engine.tokenizer.eos_token_id)
    return str(engine.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))


def test_rows_joining_a_running_batch_decode_as_if_alone(engine: Engine, reference: Engine) -> None:
    """Continuous batching: new rows are prefilled into the running batch between steps; rows that
    finish leave it (and the cache drops them). Greedy outputs equal transformers' generate."""
    ends, engine.end_tokens = engine.end_tokens, frozenset()  # a random tiny model may pick EOS; decode every row
    try:
        batch = Batch()
        engine.join(batch, [("long", Item("a", Decoding(max_new_tokens=90, temperature=0)))])
        finished: dict[str, Output] = {}
        for step in range(120):
            if step == 5:
                engine.join(batch, [("short", Item("the old fox runs to the river", Decoding(max_new_tokens=3,
                                                                                            temperature=0))),
                                    ("middle", Item("two three", Decoding(max_new_tokens=40, temperature=0)))])
            if step == 20:
                engine.join(batch, [("late", Item("one", Decoding(max_new_tokens=30, temperature=0)))])
            finished.update(engine.step(batch))
            if not len(batch):
                break
    finally:
        engine.end_tokens = ends
    assert set(finished) == {"long", "short", "middle", "late"} and not batch.rows
    for key, prompt, tokens in [("long", "a", 90), ("short", "the old fox runs to the river", 3),
                                ("middle", "two three", 40), ("late", "one", 30)]:
        assert finished[key].completion_tokens == tokens and finished[key].finish_reason == "length"
        assert finished[key].text == greedy_reference(reference, prompt, tokens), key


def test_growing_cache_keeps_and_concatenates_rows() -> None:
    layer, other = GrowingLayer(), GrowingLayer()
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    layer.update(k, -k)
    assert layer.buffers is not None and layer.buffers[0].shape[2] == room_for(3)
    for _ in range(100):  # past several growths: contents survive
        layer.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    keys, values = layer.filled()
    assert keys.shape == (2, 1, 103, 2) and torch.equal(keys[:, :, :3], k) and keys[:, :, 3:].eq(1).all()
    assert torch.equal(values[:, :, :3], -k) and layer.buffers[0].shape[2] < 2 * 103
    layer.keep(torch.tensor([1]), start=2)
    keys, _ = layer.filled()
    assert keys.shape == (1, 1, 101, 2) and torch.equal(keys[0, 0, 0], k[1, 0, 2])
    other.update(torch.full((1, 1, 2, 2), 7.0), torch.full((1, 1, 2, 2), 7.0))
    layer.concat(other)
    keys, _ = layer.filled()
    assert keys.shape == (2, 1, 101, 2)
    assert torch.equal(keys[1, 0, -2:], torch.full((2, 2), 7.0)) and not keys[1, 0, :-2].any()
    assert not layer.buffers[0][:, :, 101:].any()  # room not yet written is zero (read by lean attention)


def test_lean_gpt2_matches_transformers_with_padding_and_cache(tiny_model: Path, reference: Engine) -> None:
    lean = Engine.load(str(tiny_model), dtype="fp32", batch_hint=0)
    assert lean.lean is not None
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    caches = GrowingCache(), GrowingCache()
    for _ in range(20):  # prefill, then decode steps past the first growth of the cache
        expected = reference._forward(ids, attention, positions, caches[0])
        got = lean._forward(ids, attention, positions, caches[1])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        ids = expected.argmax(dim=-1, keepdim=True)
        attention = torch.cat([attention, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1


@pytest.mark.parametrize("dtype", [
    "fp32", pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_fast_bf16(), reason="oneDNN packs bf16 "
                                                           "on CPUs with AVX512 (with fast bf16) only"))])
@pytest.mark.parametrize("lean", [True, False])
def test_packed_linear_layers_match_the_plain_model(tiny_model: Path, lean: bool, dtype: str) -> None:
    plain = Engine.load(str(tiny_model), dtype=dtype, batch_hint=0, lean=False)
    packed = Engine.load(str(tiny_model), dtype=dtype, batch_hint=8, lean=lean)
    assert plain.packed_layers == 0 and packed.packed_layers == 2 * 4 + 1  # 4 per block + output head
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    expected = plain._forward(ids, attention, positions, GrowingCache())
    got = packed._forward(ids, attention, positions, GrowingCache())
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_rows_with_the_same_prompt_share_one_prefill_and_decode_as_if_alone(engine: Engine) -> None:
    """A request's n samples: the prompt is prefilled once for all of them (one row through the model),
    and each sample decodes exactly as it would alone."""
    samples = [Item("the old fox", Decoding(max_new_tokens=8, temperature=1.0, seed=seed)) for seed in (5, 6, 7)]
    alone = [engine.generate([item])[0] for item in samples]
    forward, prefilled = engine._forward, []

    def counted(input_ids: Any, *args: Any) -> Any:
        if input_ids.shape[1] > 1:  # a prefill, not a decode step
            prefilled.append(input_ids.shape[0])
        return forward(input_ids, *args)

    engine._forward = counted  # type: ignore[method-assign]
    try:
        together = engine.generate([*samples, Item("two", Decoding(max_new_tokens=8, temperature=0))])
    finally:
        engine._forward = forward  # type: ignore[method-assign]
    assert prefilled == [2]  # "the old fox" once, "two" once
    assert together[:3] == alone


def test_log_probabilities_are_the_models_own_for_each_generated_token(engine: Engine, reference: Engine) -> None:
    """Checked against one plain forward pass of the model over the prompt and the tokens the row generated,
    in a batch with a row that asks for none, sampled at temperature 2 (they are the model's, before
    sampling)."""
    prompt = "the old fox"
    asked = Item(prompt, Decoding(max_new_tokens=6, temperature=2.0, seed=7, logprobs=3))
    batch = Batch()
    engine.join(batch, [("asked", asked), ("other", Item("two", Decoding(max_new_tokens=4, temperature=0)))])
    row = batch.rows[0]
    outputs: dict[str, Output] = {}
    while len(batch):
        outputs.update(engine.step(batch))
    output, generated = outputs["asked"], list(row.generated)
    assert outputs["other"].logprobs is None and output.logprobs is not None
    alone = engine.generate([asked])[0].logprobs
    assert alone is not None and [t.token for t in alone] == [t.token for t in output.logprobs]
    assert [t.logprob for t in alone] == pytest.approx([t.logprob for t in output.logprobs], abs=1e-4)
    assert [t.token for t in output.logprobs] == [engine.tokenizer.decode([i]) for i in generated]
    # Each token's own bytes (its text may be U+FFFD, part of a character): together, the row's text.
    joined = b"".join(bytes(t.raw()) for t in output.logprobs)
    assert joined.decode(errors="replace") == engine.tokenizer.decode(generated)
    assert all(len(t.top_raw()) == len(t.top) for t in output.logprobs)
    ids = torch.tensor([engine.encode(prompt) + tuple(generated)])
    with torch.inference_mode():
        expected = reference.model(ids).logits[0].float().log_softmax(dim=-1)
    start = len(engine.encode(prompt)) - 1
    for k, (token, found) in enumerate(zip(generated, output.logprobs, strict=True)):
        position = expected[start + k]
        assert found.logprob == pytest.approx(float(position[token]), abs=1e-4)
        best = position.topk(3)
        assert [t for t, _ in found.top] == [engine.tokenizer.decode([i]) for i in best.indices.tolist()]
        assert [lp for _, lp in found.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_a_stop_string_leaves_out_the_tokens_it_cut(engine: Engine) -> None:
    greedy = Decoding(max_new_tokens=12, temperature=0, logprobs=0)
    whole = engine.generate([Item("the old fox", greedy)])[0]
    assert whole.logprobs is not None and all(t.top == () for t in whole.logprobs)
    cut_at = len(whole.logprobs[0].token) + len(whole.logprobs[1].token)
    stop = whole.text[cut_at:cut_at + 2]
    stopped = engine.generate([Item("the old fox", Decoding(max_new_tokens=12, temperature=0, logprobs=0,
                                                            stop=(stop,)))])[0]
    assert stopped.text == whole.text[:whole.text.find(stop)]
    assert stopped.logprobs is not None
    assert "".join(t.token for t in stopped.logprobs) == stopped.text[:len("".join(t.token for t in stopped.logprobs))]
    assert len(stopped.logprobs) <= len(whole.logprobs) and stopped.logprobs == whole.logprobs[:len(stopped.logprobs)]


def test_what_may_be_streamed_carries_the_log_probabilities_of_the_tokens_inside_it(engine: Engine) -> None:
    """Step by step, a streaming row's log-probabilities cover exactly the tokens whose text is wholly in
    the streamable text, grow as it grows, and end as a prefix of the output's."""
    greedy = Decoding(max_new_tokens=12, temperature=0, logprobs=1)
    whole = engine.generate([Item("the old fox", greedy)])[0]
    assert whole.logprobs is not None and len(whole.logprobs) > 3
    stop = whole.text[len("".join(t.token for t in whole.logprobs[:3])):][:3]
    batch = Batch()
    engine.join(batch, [("row", Item("the old fox", Decoding(max_new_tokens=12, temperature=0, logprobs=1,
                                                              stop=(stop,))))])
    seen: list[tuple[str, tuple[Any, ...]]] = []
    outputs: dict[str, Output] = {}
    while len(batch):
        outputs.update(engine.step(batch))
        ready = engine.streamable_texts(batch, lambda key: True)
        if "row" in ready:
            assert ready["row"].logprobs is not None
            seen.append((ready["row"].text, ready["row"].logprobs))
    final = outputs["row"].logprobs
    assert seen and final is not None
    for (text, logprobs), (later_text, later) in itertools.pairwise(seen):
        assert later_text.startswith(text) and later[:len(logprobs)] == logprobs
    for text, logprobs in seen:
        covered = "".join(t.token for t in logprobs)
        assert text.startswith(covered) and logprobs == final[:len(logprobs)]
    assert engine.streamable_texts(batch, lambda key: True) == {}


def test_prompt_log_probabilities_are_those_of_a_plain_forward_pass(engine: Engine, reference: Engine) -> None:
    """Asked with `prompt_logprobs`, each prompt token after the first gets its log-probability given the
    ones before it and the most likely alternatives; rows sharing a prompt share the scores."""
    prompt = "the old fox jumps over"
    asked = Decoding(max_new_tokens=2, temperature=0, logprobs=2, prompt_logprobs=True)
    both = engine.generate([Item(prompt, asked), Item(prompt, asked), Item("two", Decoding(max_new_tokens=2))])
    found = both[0].prompt_logprobs
    assert found is not None and found == both[1].prompt_logprobs and both[2].prompt_logprobs is None
    ids = list(engine.encode(prompt))
    assert [t.token for t in found] == [engine.tokenizer.decode([i]) for i in ids]
    assert found[0].logprob is None and found[0].top == ()
    with torch.inference_mode():
        expected = reference.model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
    for k, scored in enumerate(found[1:]):
        assert scored.logprob == pytest.approx(float(expected[k, ids[k + 1]]), abs=1e-4)
        best = expected[k].topk(2)
        assert [t for t, _ in scored.top] == [engine.tokenizer.decode([i]) for i in best.indices.tolist()]


def test_a_step_picks_the_tokens_before_the_model_runs_and_a_cancel_or_join_between_is_safe(engine: Engine) -> None:
    """`choose` tells the new tokens (and the rows that finished) before `forward` runs the model on them:
    a row cancelled in between is left out of that pass, and a join in between first runs it."""
    greedy = Decoding(max_new_tokens=6, temperature=0)
    alone = engine.generate([Item("the old fox", greedy), Item("two", greedy)])
    batch = Batch()
    engine.join(batch, [("a", Item("the old fox", greedy)), ("b", Item("two", greedy)),
                        ("c", Item("one", greedy))])
    engine.choose(batch)
    assert batch.logits is None and batch.chosen is not None and all(len(r.generated) <= 1 for r in batch.rows)
    engine.cancel(batch, {"c"})
    assert [r.key for r in batch.rows] == ["a", "b"] and batch.chosen.shape[0] == 2
    engine.join(batch, [("d", Item("two", greedy))])
    outputs: dict[str, Output] = {}
    while len(batch):
        outputs.update(engine.step(batch))
    assert outputs == {"a": alone[0], "b": alone[1], "d": alone[1]}
