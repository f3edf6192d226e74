"""The operator's AMQP module against the real RabbitMQ: the contract's queues, figures from the
management API, an argument RabbitMQ cannot change named by its spec field, deletion."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pika
import pytest

from kubelm_contract import queues
from kubelm_contract.queues import QueueSpec
from kubelm_operator.broker import Broker, BrokerUnavailable, QueueConflict, conflict
from support import ClusterEnv

pytestmark = pytest.mark.services


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_precondition_failed_names_the_spec_field() -> None:
    error = conflict("PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'kubelm.a.b.requests' in "
                     "vhost '/': received the value '10' of type 'signedint' but current is none")
    assert error.field == "spec.queue.maxLength"
    assert str(error).startswith("spec.queue.maxLength: the existing queue was declared otherwise")
    assert conflict("something else").field == "spec.queue"


@pytest.mark.cluster
def test_declares_the_contracts_queues_reports_figures_and_deletes(cluster: ClusterEnv) -> None:
    namespace, model = f"t-{uuid.uuid4().hex[:6]}", "gpt2"
    spec = QueueSpec(type="quorum", max_length=100, message_ttl_seconds=60, delivery_limit=2)

    async def scenario() -> None:
        broker = Broker(cluster.amqp_url, cluster.rabbitmq_api_url)
        try:
            name = await broker.declare(namespace, model, spec)
            assert name == queues.request_queue(namespace, model)
            assert await broker.declare(namespace, model, spec) == name  # idempotent

            connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
            channel = connection.channel()
            channel.confirm_delivery()  # each publish returns once the queue has the message (Raft-committed)
            for i in range(5):
                channel.basic_publish("", name, json.dumps({"i": i}).encode())
            connection.close()
            assert await broker.ready_now(namespace, model) == (5, 0)  # at once, no statistics interval

            async def five_ready() -> bool:
                stats = await broker.stats(namespace, model, max_age=0)
                return stats is not None and stats.ready == 5
            for _ in range(200):  # the management API refreshes its figures every second
                if await five_ready():
                    break
                await asyncio.sleep(0.1)
            stats = await broker.stats(namespace, model, max_age=0)
            assert stats is not None and (stats.ready, stats.unacked, stats.depth, stats.consumers) == (5, 0, 5, 0)

            # A consumer holding two unacknowledged deliveries, as a worker does with its prefetch.
            consumer = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
            consuming = consumer.channel()
            consuming.basic_qos(prefetch_count=2)
            consuming.basic_consume(name, lambda *_: None)
            consumer.process_data_events(time_limit=0.5)

            async def one_consumer() -> bool:
                stats = await broker.stats(namespace, model, max_age=0)
                return stats is not None and (stats.consumers, stats.unacked) == (1, 2)
            for _ in range(200):
                if await one_consumer():
                    break
                consumer.process_data_events(time_limit=0)
                await asyncio.sleep(0.1)
            stats = await broker.stats(namespace, model, max_age=0)
            assert stats is not None and (stats.ready, stats.unacked, stats.consumers) == (3, 2, 1)
            consumer.close()  # the two go back to the queue

            with pytest.raises(QueueConflict) as info:
                await broker.declare(namespace, model, QueueSpec(type="quorum", max_length=10, delivery_limit=2,
                                                                 message_ttl_seconds=60))
            assert info.value.field == "spec.queue.maxLength"
            assert await broker.declare(namespace, model, spec) == name  # the channel is usable again

            await broker.delete(namespace, model)
            assert await broker.stats(namespace, model, max_age=0) is None
            assert await broker.ready_now(namespace, model) is None
        finally:
            await broker.close()

    _run(scenario())


def test_unreachable_broker_is_an_error_that_says_so() -> None:
    async def scenario() -> None:
        broker = Broker("amqp://guest:guest@127.0.0.1:1/%2F", "http://guest:guest@127.0.0.1:1", timeout=2)
        try:
            with pytest.raises(BrokerUnavailable, match="RabbitMQ"):
                await broker.declare("ns", "m", QueueSpec())
            with pytest.raises(BrokerUnavailable, match="management API"):
                await broker.stats("ns", "m")
        finally:
            await broker.close()
    _run(scenario())


@pytest.mark.cluster
def test_the_queue_has_exactly_the_contracts_arguments(cluster: ClusterEnv) -> None:
    """Read back from the management API, not compared as dicts in Python."""
    namespace, model = f"t-{uuid.uuid4().hex[:6]}", "args"
    spec = QueueSpec(type="quorum", max_length=7, message_ttl_seconds=30, delivery_limit=4)

    async def scenario() -> dict[str, Any]:
        broker = Broker(cluster.amqp_url, cluster.rabbitmq_api_url)
        try:
            await broker.declare(namespace, model, spec)
            vhost = "%2F"
            found = await broker._get(f"/api/queues/{vhost}/{queues.request_queue(namespace, model)}")
            await broker.delete(namespace, model)
            assert found is not None
            return dict(found["arguments"])
        finally:
            await broker.close()

    arguments = _run(scenario())
    assert arguments == queues.request_queue_arguments(namespace, model, spec)


@pytest.mark.cluster
def test_many_models_declared_at_once_each_get_their_queues_and_a_missing_one_reads_none(cluster: ClusterEnv) -> None:
    namespace = f"t-{uuid.uuid4().hex[:6]}"
    models = [f"m{i}" for i in range(12)]

    async def scenario() -> None:
        broker = Broker(cluster.amqp_url, cluster.rabbitmq_api_url, lanes=3)
        try:
            names = await asyncio.gather(*(broker.declare(namespace, m, QueueSpec()) for m in models))
            assert names == [queues.request_queue(namespace, m) for m in models]
            # A passive declare of a queue that is not there closes that lane's channel: the next call
            # on the same lane opens another.
            assert await broker.ready_now(namespace, "absent") is None
            assert await asyncio.gather(*(broker.ready_now(namespace, m) for m in models)) == [(0, 0)] * len(models)
            await asyncio.gather(*(broker.delete(namespace, m) for m in models))
            assert await asyncio.gather(*(broker.ready_now(namespace, m) for m in models)) == [None] * len(models)
        finally:
            await broker.close()
    _run(scenario())


@pytest.mark.cluster
def test_the_dead_letter_exchange_is_declared_once_a_channel_and_again_after_it_was_deleted(
        cluster: ClusterEnv) -> None:
    namespace = f"t-{uuid.uuid4().hex[:6]}"

    def exchange_exists() -> bool:
        connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
        try:
            connection.channel().exchange_declare(queues.DEAD_LETTER_EXCHANGE, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker:
            return False
        finally:
            if connection.is_open:
                connection.close()

    def delete_exchange() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
        connection.channel().exchange_delete(queues.DEAD_LETTER_EXCHANGE)
        connection.close()

    async def scenario() -> None:
        broker = Broker(cluster.amqp_url, cluster.rabbitmq_api_url, lanes=1)
        try:
            await broker.declare(namespace, "a", QueueSpec())
            delete_exchange()
            # The lane's channel believes the exchange is there: binding the next dead-letter queue fails...
            with pytest.raises(BrokerUnavailable, match="404"):
                await broker.declare(namespace, "b", QueueSpec())
            # ...which closes the channel; the next declaration, on a new one, declares the exchange again.
            await broker.declare(namespace, "b", QueueSpec())
            assert exchange_exists()
            for model in ("a", "b"):
                await broker.delete(namespace, model)
        finally:
            await broker.close()
    _run(scenario())


def test_a_failing_management_api_is_asked_once_and_its_failure_remembered() -> None:
    """A slow or failing management API answers every model from one request, not one each in turn."""
    requests: list[float] = []

    async def scenario() -> list[str]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            requests.append(asyncio.get_running_loop().time())
            await asyncio.sleep(0.3)  # slow, then failing
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        broker = Broker(None, f"http://guest:guest@127.0.0.1:{port}")
        try:
            async def one(model: str) -> str:
                try:
                    await broker.stats("ns", model)
                except BrokerUnavailable as e:
                    return str(e)
                return "answered"
            return list(await asyncio.gather(*(one(f"m{i}") for i in range(20))))
        finally:
            await broker.close()
            server.close()
    errors = _run(scenario())
    assert len(requests) == 1, "one request for twenty models"
    assert all("503" in e for e in errors), errors
    assert sum("not asked again" in e for e in errors) == 19


@pytest.mark.cluster
def test_a_connection_the_broker_closed_while_idle_is_opened_again_without_an_error(cluster: ClusterEnv) -> None:
    """An idle connection misses its heartbeats and RabbitMQ closes it: the next call must not fail for it."""
    import urllib.parse
    import urllib.request
    from base64 import b64encode

    name, namespace = f"broker-test-{uuid.uuid4().hex[:6]}", f"t-{uuid.uuid4().hex[:6]}"
    parts = urllib.parse.urlsplit(cluster.rabbitmq_api_url)
    auth = "Basic " + b64encode(f"{parts.username}:{parts.password}".encode()).decode()

    def management(method: str, path: str) -> Any:
        request = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}{path}", method=method,
                                         headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return json.loads(body) if body else None

    async def scenario() -> None:
        broker = Broker(cluster.amqp_url, cluster.rabbitmq_api_url, lanes=1, name=name)
        try:
            await broker.declare(namespace, "m", QueueSpec())
            for _ in range(100):  # the management API lists a new connection after its stats tick
                mine = [c["name"] for c in management("GET", "/api/connections")
                        if (c.get("client_properties") or {}).get("connection_name") == f"{name} lane 0"]
                if mine:
                    break
                await asyncio.sleep(0.2)
            assert mine, "the lane's connection, by its name"
            for connection in mine:
                management("DELETE", f"/api/connections/{urllib.parse.quote(connection, safe='')}")
            await asyncio.sleep(0.5)
            assert await broker.ready_now(namespace, "m") == (0, 0)
            await broker.delete(namespace, "m")
        finally:
            await broker.close()
    _run(scenario())
