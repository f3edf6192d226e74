"""A worker in this process, on the real RabbitMQ, with its engine adjusted for the case under test."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest

from kubelm_contract import keys, protocol, queues
from kubelm_contract.settings import load
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime.broker import RpcClient, new_request_id
from kubelm_runtime.redis_store import RedisStore
from kubelm_runtime.serve.engine import Batch, Engine
from kubelm_runtime.serve.settings import ServeConfig
from kubelm_runtime.serve.worker import MAX_CONSECUTIVE_BATCH_FAILURES, Worker
from support import ClusterEnv, eventually

from .conftest import dead_letters, ready_messages

pytestmark = [pytest.mark.services]

Ask = Callable[[str, int], Awaitable[dict[str, Any]]]


@contextmanager
def running_worker(cluster: ClusterEnv, engine: Engine, tmp_path: Path, name: str, redis_url: str | None = None,
                   **overrides: Any) -> Iterator[tuple[Worker, Ask]]:
    """A Worker looping in a thread and `ask(prompt, max_new_tokens)`, which sends a request the way the
    gateway does and returns the reply; the worker drains when the block ends."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    config = load(ServeConfig, {"name": name, "namespace": namespace, "model": {"uri": "unused"},
                                "cacheDir": str(tmp_path), "dtype": "fp32", **overrides})
    worker = Worker(config, cluster.amqp_url, redis_url, engine, "digest")
    running = threading.Thread(target=worker.run, daemon=True)
    running.start()
    client = RpcClient(cluster.amqp_url)
    client.start()

    async def ask(prompt: str, tokens: int) -> dict[str, Any]:
        request_id = new_request_id()
        body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": [prompt], "model": name,
                           "params": {"max_new_tokens": tokens, "temperature": 0},
                           "deadline": time.time() + 60}).encode()
        return json.loads(await client.call(queues.request_queue(namespace, name), body, request_id, 60))

    try:
        eventually(lambda: worker.health.ready, timeout=30, what="worker consuming")
        yield worker, ask
    finally:
        client.close()
        worker.draining = True
        running.join(30)
    assert not running.is_alive() and not worker.channel.unacked


def test_a_failing_decode_step_answers_every_request_in_the_batch_and_dead_letters_it(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="fp32")

    def broken_forward(batch: Batch) -> None:
        raise RuntimeError("simulated device failure")

    engine.forward = broken_forward  # type: ignore[method-assign]  # the prefill works, decoding fails
    with running_worker(cluster, engine, tmp_path, "broken",
                        batching={"maxBatchSize": 4, "maxWaitMillis": 200}) as (worker, ask):
        async def together() -> list[dict[str, Any]]:
            return list(await asyncio.gather(ask("the old fox", 4), ask("two", 4)))

        replies = asyncio.run(together())
    for reply in replies:
        assert reply["ok"] is False
        assert reply["error"]["type"] == protocol.INTERNAL
        assert "simulated device failure" in reply["error"]["message"]
    dead: list[tuple[dict, bytes]] = []
    eventually(lambda: len(dead.__iadd__(dead_letters(cluster, worker.config.namespace, "broken"))) >= 2,
               timeout=10, what="both requests dead-lettered")
    assert {headers[queues.ERROR_TYPE_HEADER] for headers, _ in dead} == {protocol.INTERNAL}
    errors = worker.metrics.registry.get_sample_value("kubelm_errors_total", {"type": protocol.INTERNAL})
    assert errors == 2


def test_a_request_arriving_mid_batch_joins_it_and_is_answered_first(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """Continuous batching in the worker: a short request sent while a long one decodes joins the
    running batch at the next step (no wait for the batch to end) and is answered when it is done."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    engine.end_tokens = frozenset()  # a tiny model may pick EOS early; decode every row to its length
    order: list[str] = []
    decode, arrived = engine.choose, threading.Event()
    with running_worker(cluster, engine, tmp_path, "joins", limits={"maxNewTokens": 200},
                        batching={"maxBatchSize": 4, "maxWaitMillis": 0}) as (worker, ask):
        def step_once_the_short_one_arrived(batch: Batch) -> list[Any]:
            # The long request's decoding waits (on the worker's own thread, still taking deliveries) until
            # the short one has been delivered: however slow the machine, it arrives mid-batch.
            while not arrived.is_set():
                if len(worker.batcher) or len(worker.in_flight) > 1:
                    arrived.set()
                else:
                    worker.channel.wait(0.01)
            return decode(batch)

        engine.choose = step_once_the_short_one_arrived  # type: ignore[method-assign]

        async def answered(prompt: str, tokens: int) -> dict[str, Any]:
            reply = await ask(prompt, tokens)
            order.append(prompt)
            return reply

        async def long_then_short() -> tuple[dict[str, Any], dict[str, Any]]:
            long = asyncio.ensure_future(answered("long", 200))
            while not worker.in_flight:
                await asyncio.sleep(0.001)
            short = await answered("short", 2)
            return await long, short

        long, short = asyncio.run(long_then_short())
    assert order == ["short", "long"]
    assert short["ok"] and short["choices"][0]["completion_tokens"] == 2 and short["timings"]["batch_size"] == 2
    assert long["ok"] and long["choices"][0]["completion_tokens"] == 200 and long["timings"]["batch_size"] == 1


def held_steps(engine: Engine, worker: Worker, may_step: Callable[[int], bool], give_up: float = 60) -> list[int]:
    """Wraps the engine's decode step (its first half, picking the tokens): step i waits, on the worker's
    own thread and still taking deliveries and cancellations, until `may_step(i)` (or `give_up` seconds).
    Returns the rows decoded per step, filled as the worker steps."""
    decode, rows = engine.choose, []

    def step(batch: Batch) -> list[Any]:
        until = time.monotonic() + give_up
        while not may_step(len(rows)) and time.monotonic() < until:
            worker.channel.wait(0.01)
        rows.append(len(batch))
        return decode(batch)

    engine.choose = step  # type: ignore[method-assign]
    return rows


def _publish(cluster: ClusterEnv, worker: Worker, headers: dict[str, Any] | None = None,
             request_id: str | None = None) -> str:
    """One request straight onto the worker's queue, as the gateway sends an asynchronous one."""
    request_id = request_id or new_request_id()
    body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": ["hello"], "model": worker.config.name,
                       "params": {"max_new_tokens": 2}, "deadline": time.time() + 60}).encode()
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    connection.channel().basic_publish("", worker.queue, body, pika.BasicProperties(
        correlation_id=request_id, delivery_mode=2, headers=headers or {}))
    connection.close()
    return request_id


def test_batches_failing_in_a_row_fail_liveness_and_leave_the_queue_to_other_workers(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="fp32")

    def broken_forward(batch: Batch) -> None:
        raise RuntimeError("simulated device failure")

    engine.forward = broken_forward  # type: ignore[method-assign]
    with running_worker(cluster, engine, tmp_path, "wedged",
                        batching={"maxBatchSize": 1, "maxWaitMillis": 0}) as (worker, ask):
        for _ in range(MAX_CONSECUTIVE_BATCH_FAILURES):  # one batch each
            reply = asyncio.run(ask("the old fox", 4))
            assert reply["error"]["type"] == protocol.INTERNAL
        eventually(lambda: worker.health.failing is not None, timeout=10, what="liveness failing")
        alive, said = worker.health.liveness()
        assert not alive and not worker.health.ready
        assert said.startswith(f"failing: {MAX_CONSECUTIVE_BATCH_FAILURES} batches failed in a row")
        assert "simulated device failure" in said
        # No longer consuming: a new request stays in the queue for a healthy worker instead of being
        # dead-lettered by this one.
        _publish(cluster, worker)
        eventually(lambda: ready_messages(cluster, worker.queue) == 1, timeout=10, what="request left queued")
        assert worker.metrics.registry.get_sample_value("kubelm_requests_total", {"outcome": "error"}) == 3


def test_a_result_that_cannot_be_stored_is_counted_as_an_error(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """An asynchronous request whose result Redis cannot take is dead-lettered `unavailable`; the metrics
    say so instead of counting it answered."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    with running_worker(cluster, engine, tmp_path, "nowhere") as (worker, _):  # no Redis at all
        _publish(cluster, worker, {queues.RESULT_KEY_HEADER: keys.result("r1"), queues.RESULT_TTL_HEADER: 60})
        dead: list[tuple[dict, bytes]] = []
        eventually(lambda: len(dead.__iadd__(dead_letters(cluster, worker.config.namespace, "nowhere"))) >= 1,
                   timeout=30, what="the request dead-lettered")
        assert dead[0][0][queues.ERROR_TYPE_HEADER] == protocol.UNAVAILABLE
        sample = worker.metrics.registry.get_sample_value
        # Counted right after the dead-lettering: this thread may see the message first.
        eventually(lambda: sample("kubelm_requests_total", {"outcome": "error"}) == 1, timeout=10,
                   interval=0.02, what="counted as an error")
        assert sample("kubelm_requests_total", {"outcome": "ok"}) == 0
        assert sample("kubelm_errors_total", {"type": protocol.UNAVAILABLE}) == 1


def test_a_worker_started_while_redis_is_down_registers_its_model_when_it_returns(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="fp32")
    redis = RedisServer(tmp_path / "redis")  # not started yet: connections are refused
    with running_worker(cluster, engine, tmp_path, "late", redis_url=redis.url) as (worker, ask):
        assert not worker.registered
        with redis:
            store = RedisStore(redis.url)
            eventually(lambda: store.hget_json(keys.MODEL_REGISTRY, worker.model_id) is not None, timeout=60,
                       interval=0.2, what="the model registered")
            assert store.hget_json(keys.MODEL_REGISTRY, worker.model_id)["queue"] == worker.queue
            assert asyncio.run(ask("still serving", 2))["ok"]


def test_a_client_publishing_straight_to_the_queue_gets_the_workers_cache(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """No gateway in front: the worker looks the response cache up itself, fills it on a miss and answers
    a repeated deterministic request from it."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    with RedisServer(tmp_path / "redis") as redis, \
            running_worker(cluster, engine, tmp_path, "cached", redis_url=redis.url) as (worker, ask):
        first = asyncio.run(ask("the old fox", 4))
        second = asyncio.run(ask("the old fox", 4))
        sample = worker.metrics.registry.get_sample_value
        assert not first["cached"] and second["cached"]
        assert first["choices"] == second["choices"]
        assert sample("kubelm_response_cache_total", {"result": "miss"}) == 1
        assert sample("kubelm_response_cache_total", {"result": "hit"}) == 1
        # Counted right after the reply went out: the client may read the metrics first.
        eventually(lambda: sample("kubelm_requests_total", {"outcome": "cached"}) == 1, timeout=10,
                   interval=0.02, what="counted as cached")


def test_the_response_cache_comes_back_with_redis(cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """Redis goes away: requests are answered without the cache; it comes back (empty, as a restarted
    Redis without persistence is): after the quiet period the worker fills the cache and answers from it."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    redis = RedisServer(tmp_path / "redis")
    with redis, running_worker(cluster, engine, tmp_path, "returning", redis_url=redis.url,
                               redisRetrySeconds=1) as (worker, ask):
        assert asyncio.run(ask("the old fox", 4))["ok"]
        assert asyncio.run(ask("the old fox", 4))["cached"]
        redis.stop()
        during = [asyncio.run(ask(prompt, 4)) for prompt in ("the old fox", "a new fox")]
        assert all(reply["ok"] and not reply["cached"] for reply in during)
        assert not worker.redis.available
        redis.start()
        eventually(lambda: asyncio.run(ask("the old fox", 4))["cached"], timeout=60, interval=0.2,
                   what="answered from the cache again")
        assert worker.redis.available
        # The hit is counted in the restarted Redis (the fill before it may have come without a counted miss:
        # its lookup fell in the quiet period, the store just after it).
        assert RedisStore(redis.url).hgetall_json(keys.cache_stats(worker.model_id))["hits"] >= 1


def test_a_request_past_its_deadline_leaves_the_batch_at_the_next_step(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """Its caller has stopped waiting: the row is taken out before the next step (not decoded to its
    200 tokens), the request is answered and dead-lettered as expired, and the batch goes on without it."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    engine.end_tokens = frozenset()  # decode to the length unless stopped
    with running_worker(cluster, engine, tmp_path, "late", limits={"maxNewTokens": 200},
                        generation={"maxNewTokens": 8},
                        batching={"maxBatchSize": 4, "maxWaitMillis": 0}) as (worker, _):
        deadline = time.time() + 3.0  # room for the delivery to arrive before it, on a loaded machine too
        steps = held_steps(engine, worker, lambda _: time.time() > deadline)  # the first step waits for it
        client = RpcClient(cluster.amqp_url)
        client.start()
        try:
            request_id = new_request_id()
            body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": ["the old fox"], "model": "late",
                               "params": {"max_new_tokens": 200}, "deadline": deadline}).encode()
            reply = json.loads(asyncio.run(client.call(worker.queue, body, request_id, 60)))
        finally:
            client.close()
        assert reply["error"]["type"] == protocol.EXPIRED and "while it was being decoded" in reply["error"]["message"]
        assert steps == [1]
        assert len(worker.batch) == 0 and not worker.in_flight
    dead: list[tuple[dict, bytes]] = []
    eventually(lambda: len(dead.__iadd__(dead_letters(cluster, worker.config.namespace, "late"))) >= 1,
               timeout=30, what="the request dead-lettered")
    assert [headers[queues.ERROR_TYPE_HEADER] for headers, _ in dead] == [protocol.EXPIRED]


def test_a_request_whose_caller_goes_away_leaves_the_batch_at_the_next_step(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    """Two requests decode together; the caller of one goes away and cancels it: from the step after the
    cancellation arrived, only the other's row is decoded. The cancelled request is acknowledged, not
    answered, not dead-lettered; the other is answered in full."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    engine.end_tokens = frozenset()  # decode to the length unless stopped
    leaving = threading.Event()
    with running_worker(cluster, engine, tmp_path, "leaves", limits={"maxNewTokens": 100},
                        generation={"maxNewTokens": 8},
                        batching={"maxBatchSize": 4, "maxWaitMillis": 5000}) as (worker, _):
        def may_step(index: int) -> bool:
            if index != 5:
                return True
            leaving.set()  # the sixth step waits, taking deliveries, for the cancellation
            return len(worker.in_flight) <= 1

        rows_per_step = held_steps(engine, worker, may_step)
        client = RpcClient(cluster.amqp_url)
        client.start()

        async def call(request_id: str) -> dict[str, Any]:
            body = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": ["the old fox"],
                               "model": "leaves", "params": {"max_new_tokens": 100},
                               "deadline": time.time() + 300}).encode()
            return json.loads(await client.call(worker.queue, body, request_id, 300))

        async def one_goes_away() -> dict[str, Any]:
            stays = asyncio.ensure_future(call("stays"))
            goes = asyncio.ensure_future(call("goes"))
            while not leaving.is_set():
                await asyncio.sleep(0.01)
            goes.cancel()
            await client.cancel(worker.queue, "goes")
            return await stays

        try:
            stayed = asyncio.run(one_goes_away())
        finally:
            client.close()
        assert stayed["ok"] and stayed["choices"][0]["completion_tokens"] == 100
        assert rows_per_step[:5] == [2] * 5 and set(rows_per_step[5:]) == {1}
        assert len(rows_per_step) == 100
        sample = worker.metrics.registry.get_sample_value
        assert sample("kubelm_requests_total", {"outcome": "cancelled"}) == 1
        assert sample("kubelm_requests_total", {"outcome": "ok"}) == 1
    assert dead_letters(cluster, worker.config.namespace, "leaves") == []


def test_a_request_cancelled_before_it_is_delivered_is_skipped(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="fp32")
    with running_worker(cluster, engine, tmp_path, "skips") as (worker, ask):
        client = RpcClient(cluster.amqp_url)
        client.start()
        try:
            asyncio.run(client.cancel(worker.queue, "early"))
        finally:
            client.close()
        eventually(lambda: "early" in worker.cancelled, timeout=30, what="the cancellation received")
        steps = worker.metrics.registry.get_sample_value("kubelm_batch_size_count")
        request_id = _publish(cluster, worker, request_id="early")
        sample = worker.metrics.registry.get_sample_value
        eventually(lambda: sample("kubelm_requests_total", {"outcome": "cancelled"}) == 1, timeout=30,
                   what="skipped as cancelled")
        assert request_id == "early" and sample("kubelm_batch_size_count") == steps
        assert asyncio.run(ask("still serving", 2))["ok"]
    # The skipped request was acknowledged: running_worker checks nothing is left unacknowledged after the
    # drain (checked here, the ack of the request just answered could still be on its way: it follows the reply).


def test_latency_is_reported_as_time_to_first_token_between_tokens_and_in_all(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path) -> None:
    engine = Engine.load(str(tiny_model), dtype="fp32")
    engine.end_tokens = frozenset()  # every row decodes its 5 tokens
    with running_worker(cluster, engine, tmp_path, "timed") as (worker, ask):
        reply = asyncio.run(ask("the old fox", 5))
        sample = worker.metrics.registry.get_sample_value
        # Observed right after the reply went out: this thread may see the reply first.
        eventually(lambda: sample("kubelm_request_duration_seconds_count") == 1, timeout=10, interval=0.02,
                   what="the request's latency observed")
        first, between, whole = (sample(f"kubelm_{name}_sum") for name in (
            "time_to_first_token_seconds", "time_per_output_token_seconds", "request_duration_seconds"))
        assert sample("kubelm_time_to_first_token_seconds_count") == 1
        assert sample("kubelm_time_per_output_token_seconds_count") == 1  # one row of more than one token
        assert 0 < first < whole and between > 0 and first + 4 * between <= whole
        assert sample("kubelm_generated_tokens_total") == 5
        assert sample("kubelm_prompt_tokens_total") == reply["choices"][0]["prompt_tokens"] == len(
            engine.encode("the old fox"))


@pytest.mark.parametrize(("prompts_per_budget", "groups"), [(0, [3]), (1, [1, 1, 1]), (2, [2, 1])])
def test_a_prefill_token_budget_admits_simultaneous_requests_in_groups(
        cluster: ClusterEnv, tiny_model: Path, tmp_path: Path, prompts_per_budget: int, groups: list[int]) -> None:
    """Three requests of equal prompt length waiting together: without a budget one prefill takes them
    all; with a budget of one or two prompts' tokens, that many go first and the rest join at the next
    steps — all answered."""
    engine = Engine.load(str(tiny_model), dtype="fp32")
    prompts = ["the old fox", "the fox runs", "the old cat"]
    lengths = {len(engine.encode(p)) for p in prompts}
    assert len(lengths) == 1, lengths  # equal: the groups do not depend on the order they arrive in
    joined: list[int] = []
    calls: list[str] = []
    join, choose = engine.join, engine.choose

    def counted(batch: Batch, entries: list[Any]) -> None:
        if entries:
            joined.append(len(entries))
            calls.append("join")
        join(batch, entries)

    def chose(batch: Batch) -> Any:
        calls.append("choose")
        return choose(batch)

    engine.join, engine.choose = counted, chose  # type: ignore[method-assign]
    budget = {"maxPrefillTokens": prompts_per_budget * lengths.pop()} if prompts_per_budget else {}
    with running_worker(cluster, engine, tmp_path, "budget", batching={
            "maxBatchSize": 8, "maxWaitMillis": 1000, **budget}) as (_, ask):
        async def together() -> list[dict[str, Any]]:  # within the 1 s wait: they wait together
            return list(await asyncio.gather(*(ask(p, 3) for p in prompts)))

        replies = asyncio.run(together())
    assert all(r["ok"] for r in replies) and joined == groups
    # The first group's first tokens are picked before the next group is prefilled.
    assert calls[:2] == ["join", "choose"], calls
