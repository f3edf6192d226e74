"""The runtime's RabbitMQ door on a real broker: what its I/O thread survives."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from kubelm_runtime.broker import Delivery, RpcClient, WorkerChannel
from support import ClusterEnv, eventually, forwarded

pytestmark = pytest.mark.services


@pytest.fixture
def scratch(cluster: ClusterEnv) -> Iterator[tuple[Any, str]]:
    """A channel of the test's own and a queue of its own on the session's broker."""
    queue = f"t-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = admin.channel()
    channel.queue_declare(queue, arguments={"x-expires": 60_000})
    yield channel, queue
    channel.queue_delete(queue)
    admin.close()


def test_the_gateway_connection_thread_survives_an_error_that_is_not_amqp(cluster: ClusterEnv,
                                                                          scratch: tuple[Any, str]) -> None:
    channel, queue = scratch
    client = RpcClient(cluster.amqp_url)
    client.start()
    try:
        first = client._connection

        def fails() -> None:
            raise RuntimeError("an error inside the I/O thread")

        first.add_callback_threadsafe(fails)
        eventually(lambda: client.connected and client._connection is not first, timeout=30,
                   what="connected again on a new connection")
        asyncio.run(client.send(queue, b"{}", "id-1", 60))  # confirmed by the broker
        assert channel.queue_declare(queue, passive=True).method.message_count == 1
    finally:
        client.close()


def test_a_second_reply_to_one_request_is_dropped(cluster: ClusterEnv, scratch: tuple[Any, str]) -> None:
    """A request served twice (redelivered after a worker died with it) answers twice; the caller gets
    the first reply and the second goes nowhere, without an error."""
    channel, queue = scratch
    client = RpcClient(cluster.amqp_url)
    client.start()

    def answer_twice() -> None:
        eventually(lambda: channel.queue_declare(queue, passive=True).method.message_count == 1, timeout=30,
                   interval=0.02, what="the request queued")
        _, properties, _ = channel.basic_get(queue, auto_ack=True)
        for body in (b"first", b"second"):
            channel.basic_publish("", properties.reply_to, body,
                                  pika.BasicProperties(correlation_id=properties.correlation_id))

    async def call_then_another() -> tuple[bytes, bytes]:
        first = asyncio.ensure_future(client.call(queue, b"{}", "id-1", 60))
        await asyncio.get_running_loop().run_in_executor(None, answer_twice)
        replied = await first
        # The client still works, and the stray second reply did not reach the next call.
        second = asyncio.ensure_future(client.call(queue, b"{}", "id-2", 60))
        await asyncio.get_running_loop().run_in_executor(None, answer_twice)
        return replied, await second

    try:
        assert asyncio.run(call_then_another()) == (b"first", b"first")
    finally:
        client.close()


def test_a_cancel_the_broker_never_confirms_is_given_up_and_the_deliveries_go_back(
        cluster: ClusterEnv, scratch: tuple[Any, str]) -> None:
    """Draining waits for the broker's cancel-ok only so long: when the broker's answers stop arriving,
    the worker gives the cancel up after the deadline, closes without hanging, and what it held
    unacknowledged goes back to the queue for another worker."""
    channel, queue = scratch
    for n in range(3):
        channel.basic_publish("", queue, f"request {n}".encode())
    with forwarded(cluster.amqp_url) as (forwarder, url):
        worker = WorkerChannel(url, prefetch=10, heartbeat=600)
        delivered: list[Delivery] = []
        worker.consume(queue, delivered.append)

        def all_delivered() -> bool:
            worker.wait(0.05)
            return len(delivered) == 3

        eventually(all_delivered, timeout=30, interval=0, what="three deliveries")
        forwarder.hold_answers()
        assert worker.stop_consuming(deadline_seconds=1) is False
        assert len(worker.unacked) == 3
        closing = threading.Thread(target=worker.close, daemon=True)
        closing.start()
        closing.join(60)  # a hang, not a speed: the heartbeat (600 s) would be the only other way out
        assert not closing.is_alive(), "closing waited for a broker that does not answer"
    eventually(lambda: channel.queue_declare(queue, passive=True).method.message_count == 3, timeout=60,
               what="the unacknowledged deliveries back in the queue")
    redelivered = [channel.basic_get(queue, auto_ack=True)[0].redelivered for _ in range(3)]
    assert redelivered == [True, True, True]
