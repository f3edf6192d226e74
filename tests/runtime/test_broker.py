"""The runtime's RabbitMQ door on a real broker: what its I/O thread survives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from kubelm_runtime.broker import RpcClient
from support import ClusterEnv, eventually

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
