from __future__ import annotations

import pytest

from kubelm_runtime.serve.batching import Batcher


def test_full_batch_is_ready_at_once() -> None:
    batcher: Batcher[int] = Batcher(max_batch_size=3, max_wait=10)
    assert not batcher.ready(0) and batcher.time_left(0) is None
    for i in range(3):
        batcher.add(i, now=0)
    assert batcher.ready(0) and batcher.time_left(0) == 0
    assert batcher.take(0) == [0, 1, 2] and len(batcher) == 0


def test_partial_batch_waits_for_the_oldest_item() -> None:
    batcher: Batcher[str] = Batcher(max_batch_size=8, max_wait=0.01)
    batcher.add("a", now=100.0)
    batcher.add("b", now=100.005)
    assert not batcher.ready(100.006)
    assert batcher.time_left(100.006) == pytest.approx(0.004)
    assert batcher.ready(100.01)
    assert batcher.take(100.01) == ["a", "b"]


def test_overflow_waits_for_the_next_batch_in_order() -> None:
    batcher: Batcher[int] = Batcher(max_batch_size=2, max_wait=1)
    for i in range(5):
        batcher.add(i, now=0)
    assert batcher.take(0) == [0, 1] and batcher.ready(0)
    assert batcher.take(0) == [2, 3]
    assert not batcher.ready(0.5) and batcher.ready(1.0)
    assert batcher.take(1.0) == [4]


def test_zero_wait_sends_immediately_and_bad_settings_fail() -> None:
    batcher: Batcher[int] = Batcher(max_batch_size=4, max_wait=0)
    batcher.add(1, now=0)
    assert batcher.ready(0)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        Batcher(max_batch_size=0, max_wait=0)
    with pytest.raises(ValueError, match="max_wait >= 0"):
        Batcher(max_batch_size=1, max_wait=-1)


def test_removed_items_leave_the_wait_and_an_empty_batcher_waits_anew() -> None:
    batcher: Batcher[str] = Batcher(max_batch_size=4, max_wait=1.0)
    for item in ("a", "b", "c"):
        batcher.add(item, now=10.0)
    assert batcher.remove(lambda item: item == "b") == ["b"]
    assert batcher.remove(lambda item: item == "z") == []
    assert batcher.time_left(10.5) == pytest.approx(0.5)  # the oldest still waits from when it came
    assert batcher.remove(lambda item: True) == ["a", "c"]
    assert batcher.time_left(11.0) is None and not batcher.ready(99.0)


def test_a_token_budget_takes_the_oldest_that_fit_and_always_one() -> None:
    batcher: Batcher[int] = Batcher(max_batch_size=8, max_wait=0)
    for tokens in (60, 50, 30, 200, 10):
        batcher.add(tokens, now=0)
    assert batcher.take(1.0, budget=128, cost=lambda tokens: tokens) == [60, 50]  # 140 with the third
    assert batcher.take(2.0, budget=128, cost=lambda tokens: tokens) == [30]  # oldest first, no skipping
    assert batcher.take(3.0, budget=128, cost=lambda tokens: tokens) == [200]  # alone over the budget: taken
    assert batcher.take(4.0, limit=0, budget=128, cost=lambda tokens: tokens) == []  # no room: none
    batcher.add(40, now=4.0)
    assert batcher.take(5.0, budget=0, cost=lambda tokens: tokens) == [10, 40]  # 0: no budget
