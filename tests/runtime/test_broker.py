"""The runtime's RabbitMQ door on a real broker: what its I/O thread survives."""

from __future__ import annotations

import asyncio
import uuid

import pika
import pytest

from kubelm_runtime.broker import RpcClient
from support import ClusterEnv, eventually

pytestmark = pytest.mark.services


def test_the_gateway_connection_thread_survives_an_error_that_is_not_amqp(cluster: ClusterEnv) -> None:
    queue = f"t-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = admin.channel()
    channel.queue_declare(queue, arguments={"x-expires": 60_000})
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
        channel.queue_delete(queue)
        admin.close()
