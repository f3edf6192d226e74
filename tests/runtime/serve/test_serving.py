"""Workers and the gateway on real RabbitMQ, Redis and torch: nothing lost, bad input refused clearly."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import httpx_sse
import openai
import pika
import pytest
import yaml

from kubelm_contract import keys, protocol, queues
from kubelm_devcluster.standalone import MemcachedServer, RedisServer
from kubelm_runtime import artifacts
from kubelm_runtime.redis_store import RedisStore
from support import ClusterEnv, eventually

from .conftest import (
    Launcher,
    Process,
    close_connection,
    connections,
    dead_letters,
    declare_queues,
    free_port,
    get,
    post,
    rabbit_queue,
    ready_messages,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]


# Long completions in small batches: a worker is busy for seconds, long enough to interrupt it.
SLOW = {"generation": {"maxNewTokens": 200}, "limits": {"maxNewTokens": 256},
        "batching": {"maxBatchSize": 2, "maxWaitMillis": 5}}


def completion(gateway_url: str, model: str, prompt: str, **params: object) -> tuple[int, dict]:
    return post(f"{gateway_url}/v1/completions", {"model": model, "prompt": prompt, **params})


def test_openai_client_gets_completions(launcher: Launcher) -> None:
    launcher.worker("tiny")
    gateway = launcher.gateway()
    client = openai.OpenAI(base_url=gateway.url("/v1"), api_key="unused")
    assert "tiny" in [m.id for m in client.models.list().data]
    result = client.completions.create(model="tiny", prompt=["the old fox", "two plus"], max_tokens=5,
                                       temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in result.choices)
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens <= 10
    # n samples per prompt, seeded: ordered prompt by prompt, reproducible, each prompt counted once.
    sampled = client.completions.create(model="tiny", prompt=["the old fox", "two plus"], max_tokens=5, n=3,
                                        temperature=1.0, seed=11)
    assert [c.index for c in sampled.choices] == list(range(6))
    again = client.completions.create(model="tiny", prompt=["the old fox", "two plus"], max_tokens=5, n=3,
                                      temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]
    assert sampled.usage.prompt_tokens == result.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="over this model's limit"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)


def test_openai_client_streams_completions(launcher: Launcher) -> None:
    """stream=True through gateway, RabbitMQ and worker: several events as tokens are generated, the same
    text as without streaming, finish reasons, usage when asked for; a stop string is never streamed."""
    # No response cache: the streamed request must be generated, not answered from the first one's entry.
    launcher.worker("tiny", generation={"maxNewTokens": 8}, limits={"maxNewTokens": 64},
                    cache={"responses": {"enabled": False}})
    gateway = launcher.gateway()
    client = openai.OpenAI(base_url=gateway.url("/v1"), api_key="unused")
    whole = client.completions.create(model="tiny", prompt="the old fox", max_tokens=40, temperature=0)
    events = list(client.completions.create(model="tiny", prompt="the old fox", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [e.choices[0].text for e in events if e.choices]
    assert "".join(texts) == whole.choices[0].text
    assert len([t for t in texts if t]) > 1  # arrived in pieces, not as one reply
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == whole.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    # A stop string in the middle of a (seeded, varied) text: what comes before it streams, it and what
    # follows never do (a stop string's beginning held back until it is known: test_textstream.py).
    sampled = dict(model="tiny", prompt="the old fox", max_tokens=40, temperature=1.0, seed=2)
    text = client.completions.create(**sampled).choices[0].text  # type: ignore[call-overload]
    at = next(k for k in range(len(text) // 2, len(text) - 3)
              if text.find(text[k:k + 3]) == k and "\ufffd" not in text[k:k + 3])
    stop = text[at:at + 3]
    stopped = client.completions.create(**sampled, stop=[stop], stream=True)  # type: ignore[call-overload]
    streamed = "".join(e.choices[0].text for e in stopped if e.choices)
    assert streamed == text[:at] and stop not in streamed
    # n = 2, the first choice stopped early: its finish reason streams when it ends, while the second goes
    # on, as OpenAI streams each choice's end; each choice ends once.
    both = {**sampled, "n": 2}  # seeded: the choices take seeds 2 and 3, each reproducible
    whole_both = client.completions.create(**both).choices  # type: ignore[call-overload]
    first, second = whole_both[0].text, whole_both[1].text
    at = next(k for k in range(2, len(first) // 2) if first.find(first[k:k + 3]) == k
              and first[k:k + 3] not in second and "\ufffd" not in first[k:k + 3])
    ends = [(i, e.choices[0].index, e.choices[0].finish_reason, e.choices[0].text)
            for i, e in enumerate(client.completions.create(**both, stop=[first[at:at + 3]],  # type: ignore[call-overload]
                                                            stream=True))
            if e.choices]
    finished = [(index, reason) for _, index, reason, _ in ends if reason]
    assert sorted(finished) == [(0, "stop"), (1, whole_both[1].finish_reason)]
    first_end = next(i for i, index, reason, _ in ends if index == 0 and reason)
    # Choice 1 still streamed text after it (without the early end, choice 0's came with the reply, and
    # only choice 1's final event could follow).
    assert any(i > first_end and text and not reason for i, index, reason, text in ends if index == 1), ends


def test_concurrent_streams_on_one_gateway_connection_share_chunk_messages(launcher: Launcher) -> None:
    """Streams whose replies go to one address (a gateway with one publishing connection) get their text in
    grouped chunk messages, one per step for all of them, each stream still whole and in pieces."""
    queue = declare_queues(launcher, "tiny")
    gateway = launcher.gateway(models=["tiny"], publishConnections=1)
    client = openai.OpenAI(base_url=gateway.url("/v1"), api_key="unused")
    prompts = ["the old fox"] * 4  # a prompt the tiny model answers with text (not lone bytes held back)

    def stream(prompt: str) -> list[str]:
        return [e.choices[0].text for e in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True) if e.choices]

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(stream, prompt) for prompt in prompts]
        # Queued before a worker runs, so that they decode in one batch however fast they arrived.
        eventually(lambda: ready_messages(launcher.cluster, queue) == 4, timeout=60, what="the streams queued")
        worker = launcher.worker("tiny", cache={"responses": {"enabled": False}},
                                 batching={"maxBatchSize": 4, "maxWaitMillis": 50})
        streamed = [future.result(timeout=120) for future in futures]
    for prompt, texts in zip(prompts, streamed, strict=True):
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        assert "".join(texts) == whole.choices[0].text and len([t for t in texts if t]) > 1
    assert worker.metric("kubelm_stream_messages_total", '{kind="grouped"}') > 0


def test_worker_reexecutes_itself_on_jemalloc(launcher: Launcher) -> None:
    worker = launcher.worker("tiny")
    maps = Path(f"/proc/{worker.process.pid}/maps").read_text()
    assert "libjemalloc" in maps
    assert "memory allocator: jemalloc" in worker.output()


def test_200_concurrent_requests_are_answered_in_batches(launcher: Launcher) -> None:
    """200 requests queued through the gateway before any worker runs (so batching does not depend on how
    fast they arrive), then one worker works through the backlog in batches."""
    queue = declare_queues(launcher, "tiny")
    gateway = launcher.gateway(models=["tiny"], requestTimeoutSeconds=300)
    with ThreadPoolExecutor(max_workers=200) as pool:
        futures = [pool.submit(completion, gateway.url(), "tiny", f"count {i}", max_tokens=4, temperature=0.5)
                   for i in range(200)]
        eventually(lambda: ready_messages(launcher.cluster, queue) == 200, timeout=120, interval=0.1,
                   what="200 requests queued")
        worker = launcher.worker("tiny", batching={"maxBatchSize": 32, "maxWaitMillis": 50})
        results = [f.result() for f in futures]
    assert [status for status, _ in results] == [200] * 200
    assert len({body["id"] for _, body in results}) == 200
    steps = worker.metric("kubelm_batch_size_count")
    rows_per_step = worker.metric("kubelm_batch_size_sum") / steps
    assert worker.metric("kubelm_requests_total", '{outcome="ok"}') == 200
    assert rows_per_step > 2, rows_per_step


def _send_raw(cluster: ClusterEnv, queue: str, body: bytes, reply_to: str | None = None,
              expiration: str | None = None) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = connection.channel()
    channel.basic_publish("", queue, body, pika.BasicProperties(
        correlation_id=uuid.uuid4().hex, reply_to=reply_to, expiration=expiration, delivery_mode=2))
    connection.close()


def test_sigkill_mid_batch_loses_nothing(launcher: Launcher) -> None:
    first = launcher.worker("tiny", **SLOW)
    gateway = launcher.gateway(requestTimeoutSeconds=600)  # delivery is under test, not latency
    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(completion, gateway.url(), "tiny", f"story {i}", max_tokens=200, temperature=0.9)
                   for i in range(24)]
        eventually(lambda: first.metric("kubelm_batch_size_count") >= 1, timeout=60, interval=0.02,
                   what="first worker is working through the queue")
        assert not all(f.done() for f in futures)
        first.signal(signal.SIGKILL)
        first.wait()
        second = launcher.worker("tiny", **SLOW)
        results = [f.result() for f in futures]
    assert [status for status, _ in results] == [200] * 24
    # The killed worker's unacknowledged requests came back from the broker to the second one.
    assert second.metric("kubelm_redelivered_total") > 0


def test_sigterm_drains_without_redelivery(launcher: Launcher) -> None:
    worker = launcher.worker("tiny", **SLOW)
    gateway = launcher.gateway(requestTimeoutSeconds=600)  # delivery is under test, not latency
    queue = queues.request_queue(launcher.namespace, "tiny")
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(completion, gateway.url(), "tiny", f"story {i}", max_tokens=200, temperature=0.9)
                   for i in range(12)]
        eventually(lambda: worker.metric("kubelm_batch_size_count") >= 1, timeout=60, interval=0.02,
                   what="worker is working through the queue")
        assert not all(f.done() for f in futures)
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.output()[-2000:]
        assert "drained and stopped" in worker.output()
        # Whatever the worker had not received stays queued for the next one.
        second = launcher.worker("tiny", **SLOW)
        results = [f.result() for f in futures]
    assert [status for status, _ in results] == [200] * 12
    assert second.metric("kubelm_redelivered_total") == 0
    eventually(lambda: "redeliver" in rabbit_queue(launcher.cluster, queue).get("message_stats", {})
               or rabbit_queue(launcher.cluster, queue).get("message_stats", {}).get("ack", 0) >= 12,
               timeout=60, what="statistics refreshed")
    stats = rabbit_queue(launcher.cluster, queue).get("message_stats", {})
    assert stats.get("redeliver", 0) == 0, stats


def test_malformed_messages_are_refused_and_dead_lettered(launcher: Launcher) -> None:
    worker = launcher.worker("tiny")
    gateway = launcher.gateway()
    queue = queues.request_queue(launcher.namespace, "tiny")
    bad_bodies = [b"not json", b"[]", b'{"id": 5}', b'{"id": "x", "prompt": 3}',
                  b'{"id": "x", "prompt": "a", "params": {"top_p": 7}}',
                  b'{"id": "x", "prompt": "a", "params": {"nonsense": 1}}',
                  json.dumps({"id": "long", "prompt": "word " * 3000}).encode(), b"\xff\xfe\x00"]
    connection = pika.BlockingConnection(pika.URLParameters(launcher.cluster.amqp_url))
    channel = connection.channel()
    replies: list[bytes] = []
    channel.basic_consume("amq.rabbitmq.reply-to", lambda ch, m, p, body: replies.append(body), auto_ack=True)
    for i in range(200):
        channel.basic_publish("", queue, bad_bodies[i % len(bad_bodies)], pika.BasicProperties(
            correlation_id=str(i), reply_to="amq.rabbitmq.reply-to" if i % 2 == 0 else None))
    deadline = time.monotonic() + 60
    while len(replies) < 100 and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    connection.close()
    assert len(replies) == 100
    errors = [protocol.Reply.from_json(r).error for r in replies]
    assert {e[0] for e in errors if e} == {protocol.INVALID_REQUEST, protocol.PROMPT_TOO_LONG}
    collected: list[tuple[dict, bytes]] = []
    eventually(lambda: _collect(collected, dead_letters(launcher.cluster, launcher.namespace, "tiny")) >= 200,
               timeout=30, what="200 dead letters")
    assert len(collected) == 200
    assert all(queues.ERROR_TYPE_HEADER in headers for headers, _ in collected)
    assert worker.process.poll() is None
    status, body = completion(gateway.url(), "tiny", "still fine", max_tokens=3)
    assert status == 200 and body["choices"]


def _collect(into: list, found: list) -> int:
    into.extend(found)
    return len(into)


def test_expired_requests_are_dead_lettered(launcher: Launcher) -> None:
    launcher.worker("tiny")
    queue = queues.request_queue(launcher.namespace, "tiny")
    past = protocol.Request("late", ("x",), protocol.Decoding(), deadline=time.time() - 5)
    _send_raw(launcher.cluster, queue, past.to_json())
    dead = []
    eventually(lambda: _collect(dead, dead_letters(launcher.cluster, launcher.namespace, "tiny")) >= 1,
               timeout=30, what="expired request dead-lettered")
    headers, body = dead[0]
    assert headers[queues.ERROR_TYPE_HEADER] == protocol.EXPIRED and json.loads(body)["id"] == "late"


def test_broker_dead_letters_a_message_that_expires_in_the_queue(launcher: Launcher) -> None:
    worker = launcher.worker("idle")
    worker.signal(signal.SIGTERM)
    worker.wait()
    queue = queues.request_queue(launcher.namespace, "idle")
    request = protocol.Request("ttl", ("x",), protocol.Decoding())
    _send_raw(launcher.cluster, queue, request.to_json(), expiration="1")
    dead = []
    eventually(lambda: _collect(dead, dead_letters(launcher.cluster, launcher.namespace, "idle")) >= 1,
               timeout=30, what="broker dead-letters the expired message")
    assert dead[0][0]["x-death"][0]["reason"] in (b"expired", "expired")


def test_a_response_cache_in_memcached(launcher: Launcher) -> None:
    """`cache.responses.backend: memcached`: the worker fills Memcached, the gateway answers the repeat from
    it, Redis holds the counters and no entry."""
    with MemcachedServer() as memcached:
        where = {"KUBELM_MEMCACHED_URL": memcached.url}
        worker = launcher.worker("tiny", extra_env=where, cache={"responses": {"backend": "memcached"}})
        gateway = launcher.gateway(extra_env=where)
        first = completion(gateway.url(), "tiny", "the old fox", max_tokens=6, temperature=0)
        batches = worker.metric("kubelm_batch_size_count")
        second = completion(gateway.url(), "tiny", "the old fox", max_tokens=6, temperature=0)
        assert first[1]["choices"] == second[1]["choices"]
        assert not first[1]["kubelm"]["cached"] and second[1]["kubelm"]["cached"]
        assert worker.metric("kubelm_batch_size_count") == batches  # not through the worker
        model = f"{launcher.namespace}/tiny"
        redis = RedisStore(launcher.cluster.redis_url)
        assert redis.hgetall_json(keys.cache_stats(model)) == {"hits": 1, "misses": 1}
        assert not list(redis._client.scan_iter(match=keys.response(model, "*")))
        entry = redis.hget_json(keys.MODEL_REGISTRY, model)
        assert entry["responseCacheBackend"] == "memcached"


def test_cache_hit_skips_the_model(launcher: Launcher) -> None:
    worker = launcher.worker("tiny")
    gateway = launcher.gateway()
    first = completion(gateway.url(), "tiny", "the old fox", max_tokens=6, temperature=0)
    batches = worker.metric("kubelm_batch_size_count")
    second = completion(gateway.url(), "tiny", "the old fox", max_tokens=6, temperature=0)
    assert first[0] == second[0] == 200
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]
    assert not first[1]["kubelm"]["cached"] and second[1]["kubelm"]["cached"]
    # The gateway answered from Redis: the worker saw neither the request nor a cache lookup, and for the
    # first request it trusted the gateway's lookup instead of making its own (no miss counted there).
    assert worker.metric("kubelm_batch_size_count") == batches
    assert worker.metric("kubelm_response_cache_total", '{result="hit"}') == 0
    assert worker.metric("kubelm_response_cache_total", '{result="miss"}') == 0
    stats = RedisStore(launcher.cluster.redis_url).hgetall_json(keys.cache_stats(f"{launcher.namespace}/tiny"))
    assert stats == {"hits": 1, "misses": 1}
    sampled = completion(gateway.url(), "tiny", "the old fox", max_tokens=6, temperature=0.8)
    assert not sampled[1]["kubelm"]["cached"]
    # n seeded samples: the worker stores each row under its own seed's key.
    seeded = {"max_tokens": 6, "temperature": 1.0, "seed": 40}
    rows = completion(gateway.url(), "tiny", "the old fox", n=3, **seeded)
    again = completion(gateway.url(), "tiny", "the old fox", n=3, **seeded)
    third = completion(gateway.url(), "tiny", "the old fox", **{**seeded, "seed": 42})
    assert not rows[1]["kubelm"]["cached"] and again[1]["kubelm"]["cached"] and third[1]["kubelm"]["cached"]
    texts = [c["text"] for c in rows[1]["choices"]]
    assert [c["text"] for c in again[1]["choices"]] == texts and third[1]["choices"][0]["text"] == texts[2]
    assert again[1]["usage"] == rows[1]["usage"]


def test_requests_are_answered_while_redis_is_down(launcher: Launcher, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        launcher.worker("tiny", redis_url=redis.url)
        gateway = launcher.gateway(redis_url=redis.url, models=["tiny"])
        assert completion(gateway.url(), "tiny", "before", max_tokens=3, temperature=0)[0] == 200
        redis.stop()
        for prompt in ("during one", "during two", "before"):
            status, body = completion(gateway.url(), "tiny", prompt, max_tokens=3, temperature=0)
            assert status == 200 and not body["kubelm"]["cached"]
        redis.start()


def test_gateway_timeout_auth_and_limits(launcher: Launcher, tmp_path: Path) -> None:
    worker = launcher.worker("tiny")
    worker.signal(signal.SIGTERM)
    worker.wait()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    gateway = launcher.gateway(requestTimeoutSeconds=1, authTokenFile=str(token), maxBodyBytes=2048,
                               models=["tiny"])
    url = gateway.url("/v1/completions")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert post(url, body)[0] == 401
    status, error = post(url, body, {"Authorization": "Bearer wrong"})
    assert status == 401 and error["error"]["type"] == "authentication_error"
    status, error = post(url, body, {"api-key": "wrong"})
    assert status == 401 and "'api-key' header" in error["error"]["message"]
    auth = {"Authorization": "Bearer s3cret"}
    # OpenAI's form (the scheme's case does not matter), and Azure OpenAI's.
    for accepted in (auth, {"Authorization": "bearer s3cret"}, {"api-key": "s3cret"}):
        status, error = post(url, body, accepted)
        assert status == 504 and "no reply within 1s" in error["error"]["message"]
    assert post(url, {**body, "prompt": "y" * 5000}, auth)[0] == 413
    assert _chunked_without_end(gateway, auth, 3000) == 413
    # Streamed, with nobody to answer: no text came, so the timeout is still an HTTP error, not an event.
    status, error = post(url, {**body, "stream": True}, auth)
    assert status == 504 and "no reply within 1s" in error["error"]["message"]
    status, error = post(url, {**body, "temperature": -1}, auth)
    assert status == 400 and "temperature" in error["error"]["message"]


def test_an_empty_api_key_file_stops_the_gateway_with_a_configuration_error(tmp_path: Path,
                                                                           cluster: ClusterEnv) -> None:
    """An empty key would let anyone in who sends an empty one: refused at start-up, exit code 2."""
    token = tmp_path / "token"
    token.write_text("\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"namespace": "empty-key", "port": free_port(), "authTokenFile": str(token)}))
    done = subprocess.run([sys.executable, "-m", "kubelm_runtime", "gateway", "--config", str(config)],
                          env={**os.environ, "KUBELM_AMQP_URL": cluster.amqp_url}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and f"authTokenFile {token} is empty" in done.stderr


def _chunked_without_end(gateway: Process, headers: dict[str, str], size: int) -> int:
    """Sends `size` bytes of a chunked body and never ends it: a gateway that buffered the whole body
    before its size check would wait for the rest (and time out here)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    connection.putrequest("POST", "/v1/completions")
    for name, value in {**headers, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    for _ in range(size // 500):
        connection.send(b"1f4\r\n" + b"y" * 500 + b"\r\n")
    status = connection.getresponse().status
    connection.close()
    return status


def test_asynchronous_requests(launcher: Launcher) -> None:
    launcher.worker("tiny")
    gateway = launcher.gateway()
    status, accepted = post(gateway.url("/v1/requests"), {"model": "tiny", "prompt": "the", "max_tokens": 3})
    assert status == 202 and accepted["status"] == "pending"
    result: dict = {}

    def done() -> bool:
        code, body = get(gateway.url(f"/v1/requests/{accepted['id']}"))
        result.update(body)
        return code == 200

    eventually(done, timeout=30, what="asynchronous result stored")
    assert result["status"] == "done" and result["completion"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert get(gateway.url("/v1/requests/unknown-id"))[0] == 404


def test_broker_connection_blips_cost_latency_not_errors(launcher: Launcher) -> None:
    """Every client connection closed by the broker twice while 16 clients keep requests in flight: the
    worker connects again with its model loaded, the gateway sends again what it lost, and every request
    is answered."""
    worker = launcher.worker("tiny", batching={"maxBatchSize": 8, "maxWaitMillis": 5},
                             generation={"maxNewTokens": 24})
    gateway = launcher.gateway(models=["tiny"])
    statuses: list[int] = []
    closed: set[str] = set()
    blips: list[int] = []
    done = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not done.is_set():
            status, body = completion(gateway.url(), "tiny", f"client {c} request {i}", max_tokens=24,
                                      temperature=0.8)
            assert status == 200, body
            statuses.append(status)
            i += 1

    def open_connections() -> set[str]:
        return connections(launcher.cluster, launcher.namespace) - closed

    def more_answered(count: int) -> None:
        target = len(statuses) + count
        eventually(lambda: len(statuses) >= target, timeout=120, interval=0.05, what=f"{count} more answered")

    def blip() -> None:
        # The worker's connection and the gateway's four, once the management API lists them.
        eventually(lambda: len(open_connections()) == 5, timeout=60, interval=0.2, what="5 connections listed")
        now_open = open_connections()
        for name in now_open:
            close_connection(launcher.cluster, name)
        closed.update(now_open)
        blips.append(len(now_open))
        eventually(lambda: worker.output().count("connected to RabbitMQ again") == len(blips), timeout=60,
                   interval=0.05, what="worker connected again")

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client, c) for c in range(16)]
        try:
            for _ in range(2):
                more_answered(16)
                blip()
            more_answered(16)
        finally:
            done.set()
        for finished in clients:
            finished.result()
    assert blips == [5, 5] and set(statuses) == {200}
    assert worker.process.poll() is None
    lost = re.findall(r"lost the connection to RabbitMQ .*: (\d+) requests in the batch and (\d+) waiting",
                      worker.output())
    assert len(lost) == 2 and sum(int(a) + int(b) for a, b in lost) > 0  # the blips hit work in progress


def test_a_worker_serves_a_published_artifact(launcher: Launcher) -> None:
    """`model.artifact`: the worker fetches the model from the artifact cache into its cache directory,
    checks it, loads it and serves it; the gateway routes to it by name."""
    store = RedisStore(launcher.cluster.redis_url)
    name = f"{launcher.namespace}/tiny"
    stored = artifacts.publish(store, launcher.tiny_model, name)
    try:
        worker = launcher.worker("tiny", model={"artifact": stored.uri})
        gateway = launcher.gateway()
        status, body = completion(gateway.url(), "tiny", "the old fox", max_tokens=3, temperature=0)
        assert status == 200 and body["choices"][0]["text"] is not None
        assert f"fetched {stored.uri}" in worker.output()
    finally:
        artifacts.delete(store, name)


def test_chat_completions_with_the_official_client_sync_and_async_and_with_httpx(launcher: Launcher) -> None:
    """/v1/chat/completions through gateway, RabbitMQ and worker: the conversation rendered with the default
    template (the tiny tokenizer has none), the same text streamed and not, by the official client (sync and
    async) and by httpx reading the Server-Sent Events as a browser would; the response cache keys on the
    rendered prompt, so the same prompt sent as a completion is answered from the chat's entry."""
    launcher.worker("tiny", generation={"maxNewTokens": 8}, limits={"maxNewTokens": 64})
    gateway = launcher.gateway()
    client = openai.OpenAI(base_url=gateway.url("/v1"), api_key="unused")
    messages = [{"role": "system", "content": "You tell tales."}, {"role": "user", "content": "the old fox"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                           temperature=0)  # type: ignore[arg-type]
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.object == "chat.completion" and whole.usage and whole.usage.completion_tokens > 0

    rendered = "system: You tell tales.\nuser: the old fox\nassistant:"
    same = client.completions.create(model="tiny", prompt=rendered, max_tokens=12, temperature=0)
    assert same.choices[0].text == answer.content
    assert same.model_extra and same.model_extra["kubelm"]["cached"] is True  # the chat's cache entry

    async def streamed() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=gateway.url("/v1"), api_key="unused")
        stream = await async_client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True})  # type: ignore[arg-type]
        events = [event async for event in stream]
        assert events[0].choices[0].delta.role == "assistant"
        usage = events[-1].usage
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
        await async_client.close()
        return [e.choices[0].delta.content or "" for e in events if e.choices]
    assert "".join(asyncio.run(streamed())) == answer.content

    with httpx.Client(timeout=60) as web, httpx_sse.connect_sse(
            web, "POST", gateway.url("/v1/chat/completions"),
            json={"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}) as sse:
        assert sse.response.headers["content-type"].startswith("text/event-stream")
        data = [event.data for event in sse.iter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer.content
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason

    with pytest.raises(openai.BadRequestError, match=r"messages\.0\.role"):
        client.chat.completions.create(model="tiny",
                                       messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]


def test_logprobs_and_echo_with_the_official_client(launcher: Launcher) -> None:
    """Log-probabilities of each generated token (and the most likely alternatives) from the worker, in the
    completions and chat forms, whole and streamed; echo puts the prompt first."""
    launcher.worker("tiny", generation={"maxNewTokens": 8}, limits={"maxNewTokens": 64})
    gateway = launcher.gateway()
    client = openai.OpenAI(base_url=gateway.url("/v1"), api_key="unused")
    plain = client.completions.create(model="tiny", prompt="the old fox", max_tokens=8, temperature=0)
    found = client.completions.create(model="tiny", prompt="the old fox", max_tokens=8, temperature=0, logprobs=2)
    choice = found.choices[0]
    assert choice.text == plain.choices[0].text and choice.logprobs is not None
    tokens, logprobs, tops = choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs
    assert tokens and logprobs and tops and found.usage
    assert len(tokens) == len(logprobs) == len(tops) == found.usage.completion_tokens
    assert "".join(tokens) == choice.text
    for token, logprob, top in zip(tokens, logprobs, tops, strict=True):
        assert len(top) == 2 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5) and token in top  # greedy: the likeliest

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the old fox"}],
                                          max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)

    echoed = client.completions.create(model="tiny", prompt="the old fox", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "the old fox" + plain.choices[0].text
    # echo with logprobs: the prompt's tokens first, the first without a log-probability.
    scored = client.completions.create(model="tiny", prompt="the old fox", max_tokens=8, temperature=0, echo=True,
                                       logprobs=2).choices[0]
    assert scored.text == echoed.choices[0].text and scored.logprobs is not None
    assert "".join(scored.logprobs.tokens or ()) == scored.text
    prompt_count = len(scored.logprobs.tokens or ()) - len(tokens)
    assert prompt_count > 1 and (scored.logprobs.tokens or [])[prompt_count:] == tokens
    assert (scored.logprobs.token_logprobs or [])[0] is None and (scored.logprobs.top_logprobs or [])[0] is None
    assert all(lp is not None and lp <= 0 for lp in (scored.logprobs.token_logprobs or [])[1:])
    with pytest.raises(openai.BadRequestError, match="not streamed"):
        client.completions.create(model="tiny", prompt="x", echo=True, logprobs=1, stream=True)
    # Streamed: each token's log-probability arrives once, with the text it belongs to.
    streamed = list(client.completions.create(model="tiny", prompt="the old fox", max_tokens=8, temperature=0,
                                              logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens or ()] == tokens
    assert [lp for p in parts for lp in p.token_logprobs or ()] == pytest.approx(logprobs, abs=1e-5)
    assert [o for p in parts for o in p.text_offset or ()] == choice.logprobs.text_offset
    chat_stream = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the old fox"}], max_completion_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed_content = [t for c in chat_stream if c.choices and c.choices[0].logprobs
                        for t in c.choices[0].logprobs.content or ()]
    assert [t.token for t in streamed_content] == [t.token for t in content]
