"""What the gateway and the broker answer when a request cannot be served now: the documented 429s,
503s, dead-lettering by the queue's own limits, asynchronous results, and the health endpoints."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

import pika
import pytest

from kubelm_contract import queues
from kubelm_contract.queues import QueueSpec
from kubelm_devcluster.probes import http_get
from kubelm_devcluster.standalone import RedisServer
from support import ClusterEnv, eventually, forwarded

from .conftest import Launcher, dead_letters, declare_queues, get, post, ready_messages

pytestmark = [pytest.mark.services]


def _in_background(url: str, body: dict[str, Any]) -> None:
    """A request left waiting for its reply (nobody serves it); its answer is not awaited, and it ends
    with the gateway when the test stops it."""
    def send() -> None:
        with suppress(OSError):
            post(url, body)

    threading.Thread(target=send, daemon=True).start()


def _completions(gateway_url: str) -> str:
    return f"{gateway_url}/v1/completions"


def test_429_over_max_concurrency(launcher: Launcher) -> None:
    queue = declare_queues(launcher, "busy", QueueSpec())
    gateway = launcher.gateway(models=["busy"], maxConcurrency=1, requestTimeoutSeconds=300)
    _in_background(_completions(gateway.url()), {"model": "busy", "prompt": "first", "max_tokens": 2})
    eventually(lambda: ready_messages(launcher.cluster, queue) == 1, timeout=60, what="the first request queued")
    status, error = post(_completions(gateway.url()), {"model": "busy", "prompt": "second", "max_tokens": 2})
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    assert ready_messages(launcher.cluster, queue) == 1  # the refused one never reached the queue


def test_503_for_a_model_without_a_queue_and_for_a_full_queue(launcher: Launcher) -> None:
    full = declare_queues(launcher, "full", QueueSpec(max_length=1))  # x-overflow: reject-publish
    gateway = launcher.gateway(models=["ghost", "full"], requestTimeoutSeconds=300)
    status, error = post(_completions(gateway.url()), {"model": "ghost", "prompt": "x", "max_tokens": 2})
    assert status == 503 and "has no request queue yet" in error["error"]["message"]
    # A quorum queue takes one message past x-max-length (its length is checked before each enqueue),
    # then refuses.
    for prompt in ("first", "second"):
        _in_background(_completions(gateway.url()), {"model": "full", "prompt": prompt, "max_tokens": 2})
    eventually(lambda: ready_messages(launcher.cluster, full) == 2, timeout=60, what="the queue full")
    status, error = post(_completions(gateway.url()), {"model": "full", "prompt": "third", "max_tokens": 2})
    assert status == 503 and "at its queue limit" in error["error"]["message"]
    assert ready_messages(launcher.cluster, full) == 2


def test_503_and_not_ready_while_the_broker_is_unreachable(launcher: Launcher) -> None:
    declare_queues(launcher, "tiny", QueueSpec())
    with forwarded(launcher.cluster.amqp_url) as (forwarder, amqp_url):
        gateway = launcher.gateway(models=["tiny"], amqp_url=amqp_url, requestTimeoutSeconds=2,
                                   publishConnections=1)
        forwarder.down()
        eventually(lambda: http_get(gateway.url("/readyz"))[0] == 503, timeout=60, what="gateway not ready")
        status, error = post(_completions(gateway.url()), {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 503 and "not connected to RabbitMQ" in error["error"]["message"]
        assert http_get(gateway.url("/healthz"))[0] == 200  # alive: restarting would not bring the broker back


def _death_reasons(cluster: ClusterEnv, namespace: str, model: str) -> list[str]:
    return [str(d[0]["x-death"][0]["reason"]) for d in dead_letters(cluster, namespace, model)
            if d[0].get("x-death")]


def test_the_queue_dead_letters_past_its_delivery_limit(launcher: Launcher) -> None:
    queue = declare_queues(launcher, "flaky", QueueSpec(delivery_limit=2))
    connection = pika.BlockingConnection(pika.URLParameters(launcher.cluster.amqp_url))
    channel = connection.channel()
    channel.basic_publish("", queue, b"{}", pika.BasicProperties(delivery_mode=2))
    deliveries, reasons = 0, []

    def fail_it_until_dead_lettered() -> bool:
        """A consumer that keeps failing: each failure hands the message back, until the broker gives up."""
        nonlocal deliveries
        method, _, _ = channel.basic_get(queue)
        if method is not None:
            deliveries += 1
            channel.basic_nack(method.delivery_tag, requeue=True)
        reasons.extend(_death_reasons(launcher.cluster, launcher.namespace, "flaky"))
        return bool(reasons)

    eventually(fail_it_until_dead_lettered, timeout=60, interval=0.01, what="the message dead-lettered")
    connection.close()
    assert reasons == ["delivery_limit"]
    assert deliveries == 3  # the first delivery and the two the limit allows


def test_the_queue_dead_letters_what_waited_past_its_ttl(launcher: Launcher) -> None:
    queue = declare_queues(launcher, "stale", QueueSpec(message_ttl_seconds=1))
    connection = pika.BlockingConnection(pika.URLParameters(launcher.cluster.amqp_url))
    connection.channel().basic_publish("", queue, b"{}", pika.BasicProperties(delivery_mode=2))
    connection.close()
    reasons: list[str] = []
    eventually(lambda: bool(reasons.__iadd__(_death_reasons(launcher.cluster, launcher.namespace, "stale"))),
               timeout=60, what="the message dead-lettered")
    assert reasons == ["expired"] and ready_messages(launcher.cluster, queue) == 0


def _result(gateway_url: str, request_id: str) -> dict[str, Any]:
    """An asynchronous request's result, once it has one (200)."""
    results: list[dict[str, Any]] = []

    def answered() -> bool:
        code, result = get(f"{gateway_url}/v1/requests/{request_id}")
        results.append(result)
        return code == 200

    eventually(answered, timeout=60, interval=0.1, what=f"the result of request {request_id}")
    return results[-1]


def test_asynchronous_requests_pending_failed_and_without_redis(launcher: Launcher, tmp_path: Path) -> None:
    queue = declare_queues(launcher, "tiny", QueueSpec())
    gateway = launcher.gateway(models=["tiny"])
    body = {"model": "tiny", "prompt": "the old fox", "max_tokens": 2}
    status, accepted = post(f"{gateway.url()}/v1/requests", body)
    assert status == 202
    eventually(lambda: ready_messages(launcher.cluster, queue) == 1, timeout=60, what="the request queued")
    status, pending = get(f"{gateway.url()}/v1/requests/{accepted['id']}")  # no worker yet
    assert status == 202 and pending["status"] == "pending"
    # A request the worker refuses (its prompt is over the model's input limit) ends as `failed`.
    launcher.worker("tiny", limits={"maxInputTokens": 2})
    status, failed = post(f"{gateway.url()}/v1/requests", {**body, "prompt": "one two three four five six"})
    assert status == 202
    result = _result(gateway.url(), failed["id"])
    assert result["status"] == "failed" and result["error"]["type"] == "prompt_too_long"
    redis = RedisServer(tmp_path / "redis")  # never started: connections refused
    without = launcher.gateway(models=["tiny"], redis_url=redis.url)
    status, error = post(f"{without.url()}/v1/requests", body)
    assert status == 503 and "need Redis, which is unavailable" in error["error"]["message"]


def test_an_asynchronous_chat_is_rendered_by_the_worker_and_kept_as_a_chat_completion(launcher: Launcher) -> None:
    launcher.worker("tiny")
    gateway = launcher.gateway()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "the old fox"}], "max_completion_tokens": 3,
            "temperature": 0}
    status, accepted = post(f"{gateway.url()}/v1/requests", body)
    assert status == 202 and accepted["status"] == "pending"
    result = _result(gateway.url(), accepted["id"])
    completion = result["completion"]
    assert result["status"] == "done" and completion["object"] == "chat.completion"
    status, direct = post(f"{gateway.url()}/v1/chat/completions", body)
    assert status == 200 and completion["choices"][0]["message"] == direct["choices"][0]["message"]
    assert completion["usage"] == direct["usage"]


def test_health_endpoints_and_metrics_over_http(launcher: Launcher) -> None:
    worker = launcher.worker("tiny")
    gateway = launcher.gateway()
    request = {"model": "tiny", "prompt": "the old fox", "max_tokens": 3, "temperature": 0}
    assert post(_completions(gateway.url()), request)[0] == 200
    assert post(_completions(gateway.url()), request)[0] == 200  # answered from the cache by the gateway
    assert http_get(worker.url("/livez")) == (200, b"ok\n") and http_get(worker.url("/healthz"))[0] == 200
    assert http_get(gateway.url("/healthz"))[0] == 200
    for made_up in ("/v1/nope", "/v1/nope/again"):  # counted under one label, however many a client invents
        status, error = get(gateway.url(made_up))
        assert status == 404 and error["error"] == {"message": f"Invalid URL (GET {made_up})",
                                                    "type": "invalid_request_error", "param": None, "code": None}
    status, error = get(gateway.url("/v1/completions"))  # a POST route
    assert status == 405 and error["error"]["message"] == "Method Not Allowed (GET /v1/completions)"
    for name in ("kubelm_queue_wait_seconds_count", "kubelm_batch_wait_seconds_count",
                 "kubelm_generation_seconds_count", "kubelm_generated_tokens_total", "kubelm_prompt_tokens_total",
                 "kubelm_time_to_first_token_seconds_count", "kubelm_request_duration_seconds_count"):
        assert worker.metric(name) >= 1, name
    worker.metric("kubelm_time_per_output_token_seconds_count")  # exported (raises if not); 0 for 1-token rows
    assert worker.metric("kubelm_requests_total", '{outcome="ok"}') == 1
    assert worker.metric("kubelm_requests_total", '{outcome="cached"}') == 0
    assert worker.metric("kubelm_errors_total", '{type="internal"}') == 0
    _, text = http_get(gateway.url("/metrics"))
    exported = text.decode()
    assert 'kubelm_gateway_requests_total{route="/v1/completions",status="200"} 2.0' in exported
    assert 'kubelm_gateway_requests_total{route="other",status="404"} 2.0' in exported and "/v1/nope" not in exported
    assert 'kubelm_gateway_requests_total{route="/v1/completions",status="405"} 1.0' in exported
    assert 'kubelm_gateway_latency_seconds_count{model="tiny"} 1.0' in exported


def test_a_client_that_writes_a_large_body_first_reads_the_413(launcher: Launcher) -> None:
    """urllib writes the whole body before it reads: an 8 MiB prompt over the 1 MiB limit must come back
    as the 413 JSON error, not as a connection reset under the client's write; the connection stays
    usable for the next request. A wrong token on a large body is the same case."""
    gateway = launcher.gateway(models=["tiny"])
    url = _completions(gateway.url())
    status, error = post(url, {"model": "tiny", "prompt": "y" * (8 * 1024 * 1024), "max_tokens": 2})
    assert status == 413 and "request body over 1048576 bytes" in error["error"]["message"]

    token_gateway = launcher.gateway(models=["tiny"], authTokenFile=_token_file(launcher, "s3cret"))
    status, error = post(_completions(token_gateway.url()), {"model": "tiny", "prompt": "y" * 500_000})
    assert status == 401 and error["error"]["type"] == "authentication_error"


def _token_file(launcher: Launcher, token: str) -> str:
    path = launcher.tmp_path / "token"
    path.write_text(token)
    return str(path)


def test_the_gateway_says_where_it_listens_and_logs_each_request_unless_told_not_to(launcher: Launcher) -> None:
    declare_queues(launcher, "tiny", QueueSpec())
    logged = launcher.gateway(models=["tiny"])
    quiet = launcher.gateway(models=["tiny"], accessLog=False)
    for gateway in (logged, quiet):
        # A line is written right after its response goes out, before the gateway reads the next request:
        # once the second is answered, the first one's line is there (when there is one).
        for prompt in ("first", "second"):
            assert post(_completions(gateway.url()), {"model": "ghost", "prompt": prompt})[0] == 404
        assert f"listening on http://127.0.0.1:{gateway.port}" in gateway.output()
    assert '"POST /v1/completions" 404' in logged.output()
    assert "/v1/completions" not in quiet.output()
    assert "access log off" in quiet.output()


def test_a_client_that_disconnects_cancels_its_request_at_the_workers(launcher: Launcher) -> None:
    """No worker yet: the request waits in the queue while its client goes away. The gateway sends the
    cancellation where the queue's workers listen, naming the request waiting there, and counts a 499."""
    queue = declare_queues(launcher, "tiny", QueueSpec())
    gateway = launcher.gateway(models=["tiny"])
    listener = pika.BlockingConnection(pika.URLParameters(launcher.cluster.amqp_url))
    channel = listener.channel()
    queues.declare_cancel_exchange(channel)
    own = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(own, queues.CANCEL_EXCHANGE, routing_key=queue)
    try:
        body = json.dumps({"model": "tiny", "prompt": "never mind", "max_tokens": 2}).encode()
        client = socket.create_connection(("127.0.0.1", gateway.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        eventually(lambda: ready_messages(launcher.cluster, queue) == 1, timeout=30, what="the request queued")
        client.close()
        received: list[Any] = []
        eventually(lambda: received.append(channel.basic_get(own, auto_ack=True)) or received[-1][0] is not None,
                   timeout=30, what="the cancellation")
        cancelled = queues.parse_cancel_message(received[-1][2])
        waiting = channel.basic_get(queue, auto_ack=True)
        assert cancelled is not None and json.loads(waiting[2])["id"] == cancelled

        def counted() -> bool:
            try:
                return gateway.metric("kubelm_gateway_requests_total", '{route="/v1/completions",status="499"}') == 1
            except AssertionError:  # not counted yet: the series appears with its first count
                return False

        eventually(counted, timeout=30, what="counted as 499")
    finally:
        listener.close()
