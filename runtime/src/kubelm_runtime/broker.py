"""The runtime's only door to RabbitMQ (pika).

`WorkerChannel` consumes a model's request queue with a bounded prefetch, replies
with publisher confirms and dead-letters what it cannot serve. `RpcClient` is the
gateway's side: a thread owns a connection, publishes requests with direct
reply-to and resolves asyncio futures when replies arrive; `RpcPool` spreads
publishes over several of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from kubelm_contract import protocol, queues
from kubelm_contract.queues import QueueSpec

OnChunk = Callable[[dict[int, protocol.ChunkPart]], None]
"""Gets the parts of a streamed reply as they arrive, by choice index."""
log = logging.getLogger(__name__)
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class BrokerError(RuntimeError):
    pass


class QueueFull(BrokerError):
    """The broker refused the message (x-overflow reject-publish)."""


class NoSuchQueue(BrokerError):
    pass


class ReplyChannelLost(BrokerError):
    """A call's reply channel went with its connection; the call asks again on the next one."""


class ConnectionLost(BrokerError):
    """The connection (or its channel) went away: closed by the broker (a restart, a failover, an operator
    closing it), the network, or a missed heartbeat. Unacknowledged deliveries go back to the queue."""


# A connection or channel that is gone, as opposed to a refusal of one operation.
_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosed, pika.exceptions.ChannelWrongStateError)


@contextlib.contextmanager
def _lost_as_broker_error() -> Iterator[None]:
    try:
        yield
    except _LOST as e:
        raise ConnectionLost(f"{type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Delivery:
    tag: int
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    received: float = 0.0


def _parameters(url: str, heartbeat: int = 60, name: str | None = None) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat
    parameters.blocked_connection_timeout = 30
    if name:  # shown by the management UI and API: which process holds which connection
        parameters.client_properties = {"connection_name": name}
    return parameters


class WorkerChannel:
    """A worker's connection and channel. Every method raises ConnectionLost when the connection is gone;
    the worker then opens a new WorkerChannel (the broker has put back what this one held unacknowledged)."""

    def __init__(self, url: str, prefetch: int, heartbeat: int = 60, name: str | None = None):
        try:
            self.connection = pika.BlockingConnection(_parameters(url, heartbeat, name))
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            self.channel.basic_qos(prefetch_count=prefetch)
        except (*_LOST, OSError) as e:
            raise ConnectionLost(f"could not connect to RabbitMQ: {type(e).__name__}: {e}") from e
        self.consumer_tag: str | None = None
        self._cancelled: list[str] = []
        self._broker_silent = False
        self._chunks: Any = None
        self.unacked: set[int] = set()
        """Delivery tags received and not yet acknowledged (must be empty after a drain)."""

    def declare(self, namespace: str, model: str, spec: QueueSpec) -> str:
        with _lost_as_broker_error():
            return queues.declare_model_queues(self.channel, namespace, model, spec)

    @_lost_as_broker_error()
    def consume(self, queue_name: str, on_delivery: Callable[[Delivery], None]) -> None:
        def callback(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            self.unacked.add(method.delivery_tag)
            on_delivery(Delivery(method.delivery_tag, body, properties.reply_to, properties.correlation_id,
                                 dict(properties.headers or {}), bool(method.redelivered), time.time()))

        self.consumer_tag = self.channel.basic_consume(queue_name, callback, auto_ack=False)

    @_lost_as_broker_error()
    def consume_cancels(self, queue_name: str, on_cancel: Callable[[str], None]) -> None:
        """Receives the cancellations gateways send for requests of `queue_name`, on a queue of this
        connection's own (it goes with the connection; cancellations sent meanwhile are not seen)."""
        queues.declare_cancel_exchange(self.channel)
        own = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(own, queues.CANCEL_EXCHANGE, routing_key=queue_name)

        def callback(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            request_id = queues.parse_cancel_message(body)
            if request_id is not None:
                on_cancel(request_id)

        self.channel.basic_consume(own, callback, auto_ack=True)

    @_lost_as_broker_error()
    def stop_consuming(self, deadline_seconds: float = 30.0) -> bool:
        """Cancels the consumer; every message that reaches us before the broker's cancel-ok is still
        handed to the consumer, so nothing delivered goes back to the queue (a redelivery). False when no
        cancel-ok came within the deadline: then the consumer may still deliver until the connection closes,
        and whatever is unacknowledged at that point goes back to the queue (the broker redelivers it).

        pika rejects such late messages with requeue once a cancel is under way; this reaches into its
        channel (pika is pinned in constraints.txt; the drain test guards it) to keep them instead."""
        if self.consumer_tag is None:
            return True
        tag, self.consumer_tag = self.consumer_tag, None
        self.connection.process_data_events(time_limit=0)
        impl = self.channel._impl
        cancelled: list[bool] = []
        impl.basic_cancel(tag, callback=lambda _frame: cancelled.append(True))
        impl._cancelled.discard(tag)
        give_up_at = time.monotonic() + deadline_seconds
        while not cancelled and time.monotonic() < give_up_at:
            self.connection.process_data_events(time_limit=0.1)
        self._cancelled.append(tag)
        if not cancelled:
            self._broker_silent = True
            log.warning("the broker did not confirm the consumer's cancel within %gs; unacknowledged deliveries "
                        "go back to the queue when the connection closes", deadline_seconds)
        return bool(cancelled)

    @_lost_as_broker_error()
    def wait(self, seconds: float) -> None:
        self.connection.process_data_events(time_limit=max(0.0, seconds))

    @_lost_as_broker_error()
    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Publishes a reply and returns once the broker confirmed it."""
        self.channel.basic_publish("", reply_to, body, pika.BasicProperties(
            correlation_id=correlation_id, content_type="application/json"))

    @_lost_as_broker_error()
    def send_chunk(self, reply_to: str, body: bytes, correlation_id: str | None = None, grouped: bool = False) -> None:
        """Publishes part of a streamed reply without waiting for a confirm, on a channel of its own: chunks
        are many and best effort, and the confirmed reply that ends the stream carries the whole text.
        `grouped`: the body holds several requests' parts (protocol.chunks_message), not one request's."""
        if self._chunks is None:
            self._chunks = self.connection.channel()
        kind = protocol.CHUNKS_TYPE if grouped else protocol.CHUNK_TYPE
        self._chunks.basic_publish("", reply_to, body, pika.BasicProperties(
            correlation_id=correlation_id, type=kind, content_type="application/json"))

    @_lost_as_broker_error()
    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)
        self.unacked.discard(tag)

    @_lost_as_broker_error()
    def requeue(self, tag: int) -> None:
        """Hands a delivery back to the queue (for another consumer), unanswered."""
        self.channel.basic_nack(tag, requeue=True)
        self.unacked.discard(tag)

    @_lost_as_broker_error()
    def dead_letter(self, delivery: Delivery, routing_key: str, error_type: str, message: str) -> None:
        """Copies the request to the dead-letter queue with the reason, then acks the original."""
        headers = {**delivery.headers, queues.ERROR_TYPE_HEADER: error_type,
                   queues.ERROR_MESSAGE_HEADER: message[:1000]}
        self.channel.basic_publish(queues.DEAD_LETTER_EXCHANGE, routing_key, delivery.body, pika.BasicProperties(
            headers=headers, delivery_mode=2, correlation_id=delivery.correlation_id))
        self.ack(delivery.tag)

    def close(self, abort_after_seconds: float = 5.0) -> None:
        # Consumers cancelled in stop_consuming are gone at the broker; pika must not cancel them again.
        for tag in self._cancelled:
            self.channel._consumer_infos.pop(tag, None)
        if self._broker_silent:
            self._abort(abort_after_seconds)
            return
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if self.connection.is_open:
                self.connection.close()

    def _abort(self, seconds: float) -> None:
        """Cuts the connection without the close handshake. pika's close waits for the broker's close-ok
        with no bound, and a broker that left a cancel unanswered will not answer a close either; when the
        socket goes, the broker puts back whatever was unacknowledged. Reaches into pika the way its own
        heartbeat check does when a connection goes silent."""
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if self.connection.is_open:
                self.connection._impl._terminate_stream(pika.exceptions.StreamLostError("the broker stopped answering"))
            give_up_at = time.monotonic() + seconds
            while not self.connection.is_closed and time.monotonic() < give_up_at:
                self.connection.process_data_events(time_limit=0.1)


class RpcClient:
    """Request/reply over direct reply-to from asyncio code; one I/O thread owns the connection and opens
    another whenever it is lost.

    A connection lost under a call costs it latency, not an error: a publish that failed with the
    connection was never confirmed, so it is sent again once connected; a call still waiting for its reply
    has lost its reply channel (direct reply-to lives and dies with the connection), so its request is
    published again under the same id on the new connection. The copy sent first may still be served;
    its reply goes to the old channel, which the broker drops. Both end at the call's deadline."""

    def __init__(self, url: str, name: str | None = None):
        self.url, self.name = url, name
        self._pending: dict[str, _Call] = {}
        self._submitted: set[_Call] = set()
        """Work handed to the I/O thread that has not run yet."""
        self._lock = threading.Lock()
        self._generation = 0
        """Connections opened so far: the current one's number."""
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqp-rpc", daemon=True)
        self._connection: Any = None
        self._channel: Any = None

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._thread.is_alive()

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(f"could not connect to RabbitMQ: {self._error}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(_parameters(self.url, name=self.name))
                channel = connection.channel()
                channel.confirm_delivery()
                queues.declare_cancel_exchange(channel)  # published to when a client goes away
                channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
                self._channel, self._connection = channel, connection
                self._generation += 1
                self._ready.set()
                while not self._stop.is_set():
                    # Wakes at once for replies and for publishes handed over by _submit.
                    connection.process_data_events(time_limit=1)
                connection.close()
            except Exception as e:  # whatever broke, the thread lives on and connects again
                self._error = e
                self._ready.clear()
                lost = f"connection to RabbitMQ lost: {type(e).__name__}: {e}"
                self._lost_replies(ReplyChannelLost(lost))
                with self._lock:  # handed to the dead connection and never run: tried again on the next
                    unrun, self._submitted = self._submitted, set()
                for waiter in unrun:
                    waiter.settle(None, ConnectionLost(lost))
                if isinstance(e, pika.exceptions.AMQPError | OSError):
                    log.warning("RabbitMQ connection lost, reconnecting: %s", e)
                else:
                    log.exception("the RabbitMQ I/O thread failed; reconnecting")
                with contextlib.suppress(Exception):
                    if self._connection is not None and self._connection.is_open:
                        self._connection.close()
                time.sleep(1)

    def _on_reply(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # Parts of streamed replies (the calls go on waiting), parsed here, off the callers' event loops.
        if properties.type == protocol.CHUNKS_TYPE:
            for correlation_id, parts in protocol.parse_chunks_message(body).items():
                self._chunk(correlation_id, parts)
            return
        if properties.type == protocol.CHUNK_TYPE:
            self._chunk(properties.correlation_id or "", protocol.parse_chunk_message(body))
            return
        waiter = self._pending.pop(properties.correlation_id or "", None)
        if waiter is None:
            return  # a duplicate (redelivered request) or an abandoned call
        waiter.settle(body, None)

    def _chunk(self, correlation_id: str, parts: dict[int, protocol.ChunkPart]) -> None:
        streaming = self._pending.get(correlation_id)
        if streaming is not None and streaming.on_chunk is not None and parts:
            streaming.chunk(parts)

    def _lost_replies(self, error: BaseException) -> None:
        """Fails the calls whose request went out on the connection just lost; one whose publish has not
        been confirmed yet stays (its publish fails and is tried again)."""
        for correlation_id, waiter in list(self._pending.items()):
            if waiter.published_on:
                del self._pending[correlation_id]
                waiter.settle(None, error)

    def _publish(self, queue_name: str, body: bytes, properties: pika.BasicProperties) -> None:
        try:
            self._channel.basic_publish("", queue_name, body, properties, mandatory=True)
        except pika.exceptions.UnroutableError as e:
            raise NoSuchQueue(f"no queue {queue_name}") from e
        except pika.exceptions.NackError as e:
            raise QueueFull(f"queue {queue_name} is full") from e
        except _LOST as e:
            raise ConnectionLost(f"{type(e).__name__}: {e}") from e

    async def _connected(self, deadline: float) -> None:
        """Returns once connected; BrokerError if that takes past the deadline (loop time)."""
        loop = asyncio.get_running_loop()
        while not self.connected:
            if not self._thread.is_alive() or loop.time() >= deadline:
                raise BrokerError(f"not connected to RabbitMQ: {self._error}")
            await asyncio.sleep(0.05)

    async def _submit(self, fn: Callable[[], None], deadline: float) -> None:
        """Runs fn on the I/O thread and waits for it (publishes are confirmed there); a publish lost with
        its connection is tried again on the next one until the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            await self._connected(deadline)
            waiter = _Call(loop, loop.create_future())

            def task(waiter: _Call = waiter) -> None:
                with self._lock:
                    self._submitted.discard(waiter)
                try:
                    fn()
                except BaseException as e:
                    waiter.settle(None, e)
                else:
                    waiter.settle(None, None)

            with self._lock:
                self._submitted.add(waiter)
            try:
                self._connection.add_callback_threadsafe(task)
                # A publish not confirmed by the deadline ends the call like a missing reply: TimeoutError.
                await asyncio.wait_for(waiter.future, max(deadline - loop.time(), 0))
                return
            except (ConnectionLost, pika.exceptions.ConnectionWrongStateError) as e:
                with self._lock:
                    self._submitted.discard(waiter)
                if loop.time() >= deadline:
                    raise ConnectionLost(f"connection to RabbitMQ lost: {e}") from e
                # The I/O thread notices the loss too and connects again.
                await asyncio.sleep(0.05)

    async def call(self, queue_name: str, body: bytes, correlation_id: str, timeout: float,
                   headers: dict[str, Any] | None = None, on_chunk: OnChunk | None = None) -> bytes:
        """The reply's body. `on_chunk` gets each chunk of a streamed reply (on the caller's loop) before it;
        a streamed call whose reply channel is lost fails instead of asking again (its text was under way)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                waiter = _Call(loop, loop.create_future(), on_chunk=on_chunk)
                self._pending[correlation_id] = waiter
                # The request expires in the queue when nobody waits for it any more.
                left = max(deadline - loop.time(), 0.001)
                properties = pika.BasicProperties(
                    reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id, delivery_mode=2,
                    content_type="application/json", expiration=str(max(1, int(left * 1000))), headers=headers or {})

                def publish(waiter: _Call = waiter, properties: pika.BasicProperties = properties) -> None:
                    self._publish(queue_name, body, properties)
                    waiter.published_on = self._generation  # on the I/O thread, before any reply is read

                await self._submit(publish, deadline)
                future = waiter.future
                try:
                    return await asyncio.wait_for(future, max(deadline - loop.time(), 0))
                except ReplyChannelLost:
                    if on_chunk is not None:
                        raise
                    continue  # the reply would go to a channel that no longer exists: ask again
        finally:
            self._pending.pop(correlation_id, None)

    async def send(self, queue_name: str, body: bytes, correlation_id: str, expiration_seconds: float,
                   headers: dict[str, Any] | None = None, timeout: float = 30) -> None:
        """Publishes without waiting for a reply (asynchronous requests); retried on a new connection for up
        to `timeout` seconds when the connection is lost."""
        properties = pika.BasicProperties(
            correlation_id=correlation_id, delivery_mode=2, content_type="application/json",
            expiration=str(int(expiration_seconds * 1000)), headers=headers or {})
        deadline = asyncio.get_running_loop().time() + timeout
        await self._submit(lambda: self._publish(queue_name, body, properties), deadline)

    async def cancel(self, queue_name: str, correlation_id: str, timeout: float = 5) -> None:
        """Tells the workers of `queue_name` that nobody waits for this request any more: the one decoding
        it stops, and one that receives it later skips it. Best effort: with no worker listening (none
        running, or one connecting again) the cancellation is dropped and the reply goes nowhere."""
        body = queues.cancel_message(correlation_id)

        def publish() -> None:
            try:
                self._channel.basic_publish(queues.CANCEL_EXCHANGE, queue_name, body)
            except _LOST as e:
                raise ConnectionLost(f"{type(e).__name__}: {e}") from e

        await self._submit(publish, asyncio.get_running_loop().time() + timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class RpcPool:
    """Several RpcClients taken in turn. Each connection publishes one message at a time and waits for
    the broker's confirm (on a quorum queue, a log write: about a millisecond), so one connection
    spreads 32 simultaneous requests over 30-40 ms, more than a worker's batching wait; a few
    connections let them reach the queue together."""

    def __init__(self, url: str, size: int, name: str | None = None):
        self.clients = [RpcClient(url, name) for _ in range(max(1, size))]
        self._turn = 0

    @property
    def connected(self) -> bool:
        return any(c.connected for c in self.clients)

    def start(self, timeout: float = 30) -> None:
        for client in self.clients:
            client.start(timeout)

    def _next(self) -> RpcClient:
        for _ in range(len(self.clients)):
            self._turn = (self._turn + 1) % len(self.clients)
            if self.clients[self._turn].connected:
                break
        return self.clients[self._turn]

    async def call(self, queue_name: str, body: bytes, correlation_id: str, timeout: float,
                   headers: dict[str, Any] | None = None, on_chunk: OnChunk | None = None) -> bytes:
        return await self._next().call(queue_name, body, correlation_id, timeout, headers, on_chunk)

    async def send(self, queue_name: str, body: bytes, correlation_id: str, expiration_seconds: float,
                   headers: dict[str, Any] | None = None) -> None:
        await self._next().send(queue_name, body, correlation_id, expiration_seconds, headers)

    async def cancel(self, queue_name: str, correlation_id: str) -> None:
        await self._next().cancel(queue_name, correlation_id)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass(eq=False)
class _Call:
    """A call waiting for its reply, and the connection its request went out on (0: not yet confirmed)."""
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bytes]
    published_on: int = 0
    on_chunk: OnChunk | None = None

    def settle(self, body: bytes | None, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(_settle, self.future, body, error)

    def chunk(self, parts: dict[int, protocol.ChunkPart]) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.on_chunk, parts)  # type: ignore[arg-type]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Completes a future from the I/O thread's callback, unless the caller already gave up."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def new_request_id() -> str:
    return uuid.uuid4().hex
