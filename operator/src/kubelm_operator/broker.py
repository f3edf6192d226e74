"""The operator's only door to RabbitMQ: declaring and deleting a model's queues (AMQP) and reading
their figures (the management API).

pika's BlockingConnection is not thread-safe and blocks, so AMQP calls run on a few lanes, each
a connection with one worker thread of its own, away from the event loop; a connection is opened
on first use and again after any failure. Queues are declared with the contract's `declare_model_queues`, the same
function the workers call.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import pika
import pika.exceptions

from kubelm_contract import protocol, queues
from kubelm_contract.queues import QueueSpec

# Which spec field sets each queue argument, to name it when RabbitMQ refuses a change.
ARGUMENT_FIELDS = {
    "x-queue-type": "spec.queue.type",
    "x-max-length": "spec.queue.maxLength",
    "x-overflow": "spec.queue.maxLength",
    "x-message-ttl": "spec.queue.messageTtlSeconds",
    "x-delivery-limit": "spec.queue.deliveryLimit",
    "x-dead-letter-exchange": "spec.queue.deadLetter",
    "x-dead-letter-routing-key": "spec.queue.deadLetter",
}
STATS_COLUMNS = ",".join(("name", "messages", "messages_ready", "messages_unacknowledged", "consumers",
                          "message_stats.publish_details.rate", "message_stats.deliver_get_details.rate"))
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")


FAILURE_CACHE_SECONDS = 5.0
"""How long a failed management API listing answers for the next callers."""


class BrokerUnavailable(Exception):
    """RabbitMQ or its management API could not be reached; the message says which."""


class _QueueMissing(Exception):
    """A passive declare found no queue (the broker closed the channel with 404)."""


class QueueConflict(Exception):
    """The queue exists with arguments the spec would change (RabbitMQ cannot change them in place)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class QueueStats:
    name: str
    ready: int
    unacked: int
    consumers: int
    dead_lettered: int
    publish_rate: float
    deliver_rate: float

    @property
    def depth(self) -> int:
        return self.ready + self.unacked


def conflict(reply_text: str) -> QueueConflict:
    """The spec field behind a PRECONDITION_FAILED reply, with RabbitMQ's own words."""
    found = _INEQUIVALENT.search(reply_text)
    field = ARGUMENT_FIELDS.get(found.group(1), "spec.queue") if found else "spec.queue"
    return QueueConflict(field, f"the existing queue was declared otherwise and RabbitMQ cannot change it "
                                f"({reply_text}); delete the queue, or keep the old value")


class _Lane:
    """One AMQP connection and channel, used only from its own worker thread (pika is not thread-safe);
    opened on first use and again after any failure."""

    def __init__(self, index: int, amqp_url: str | None, timeout: float, name: str = "kubelm-operator"):
        self.amqp_url, self._timeout, self.name = amqp_url, timeout, f"{name} lane {index}"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"amqp-{index}")
        self._connection: Any = None
        self._channel: Any = None
        self._exchange_declared = False
        """The shared dead-letter exchange was declared on this lane's current channel."""

    def _open_channel(self) -> Any:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            parameters = pika.URLParameters(self.amqp_url)
            parameters.socket_timeout = self._timeout
            parameters.blocked_connection_timeout = self._timeout
            parameters.client_properties = {"connection_name": self.name}  # named in RabbitMQ's management UI
            self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()
        self._exchange_declared = False  # declared again on a new channel, in case it was deleted meanwhile
        return self._channel

    def declare(self, channel: Any, namespace: str, model: str, spec: QueueSpec) -> str:
        """The contract's declaration, the shared exchange only once per channel: a round trip less a model."""
        name = queues.declare_model_queues(channel, namespace, model, spec, exchange=not self._exchange_declared)
        self._exchange_declared = self._exchange_declared or spec.dead_letter
        return name

    def call(self, work: Any) -> Any:
        reused = self._connection is not None and self._connection.is_open
        try:
            try:
                return work(self._open_channel())
            except (pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosed,
                    pika.exceptions.ChannelWrongStateError):
                if not reused:
                    raise
                # A connection idle past the heartbeat timeout was closed by the broker (a blocking
                # connection answers heartbeats only while in use): once more on a new one. Every call
                # here is idempotent (declare, passive declare, delete).
                self._channel = self._connection = None
                return work(self._open_channel())
        except pika.exceptions.ChannelClosedByBroker as e:
            self._channel = None  # the broker closed the channel; the connection stays
            if e.reply_code == 406:
                raise conflict(e.reply_text) from e
            raise BrokerUnavailable(f"RabbitMQ refused: {e.reply_code} {e.reply_text}") from e
        except pika.exceptions.AMQPError as e:
            self._channel = self._connection = None
            raise BrokerUnavailable(f"RabbitMQ: {type(e).__name__}: {e}") from e
        except OSError as e:
            self._channel = self._connection = None
            raise BrokerUnavailable(f"RabbitMQ: {e}") from e

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()


class Broker:
    def __init__(self, amqp_url: str | None, api_url: str | None, timeout: float = 10.0, lanes: int = 4,
                 name: str = "kubelm-operator"):
        self.amqp_url, self.api_url = amqp_url, api_url
        self._timeout = timeout
        # Declaring a quorum queue takes the broker tens of milliseconds (it starts a Raft group): a few
        # connections declare for different models at once. A model always uses the same one, so its
        # calls keep their order.
        self._lanes = [_Lane(i, amqp_url, timeout, name) for i in range(lanes)]
        self._http: aiohttp.ClientSession | None = None
        self._stats: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._stats_lock = asyncio.Lock()
        self._stats_failed: tuple[float, str] | None = None
        """(when, why) the last listing failed."""

    # -- AMQP, on the lanes' worker threads -----------------------------------------------------
    def _lane(self, namespace: str, model: str) -> _Lane:
        return self._lanes[zlib.crc32(f"{namespace}/{model}".encode()) % len(self._lanes)]

    async def _run(self, namespace: str, model: str, work: Any) -> Any:
        if not self.amqp_url:
            raise BrokerUnavailable("no RabbitMQ URL configured (KUBELM_AMQP_URL)")
        lane = self._lane(namespace, model)
        return await asyncio.get_running_loop().run_in_executor(lane.executor, lane.call, work)

    async def declare(self, namespace: str, model: str, spec: QueueSpec) -> str:
        """The model's request queue (and dead-letter queue) exist with the spec's arguments."""
        lane = self._lane(namespace, model)
        return str(await self._run(namespace, model, lambda channel: lane.declare(channel, namespace, model, spec)))

    async def ready_now(self, namespace: str, model: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of the request queue as the broker has them this moment (a passive
        declare), or None when it does not exist. The management API's figures lag by its statistics
        interval and, for quorum queues, the queue's own metrics tick: seconds the autoscaler should not wait."""
        def work(channel: Any) -> tuple[int, int] | None:
            try:
                method = channel.queue_declare(queues.request_queue(namespace, model), passive=True).method
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 404:  # the channel is closed now; the lane opens another next time
                    raise _QueueMissing from e
                raise
            return int(method.message_count), int(method.consumer_count)
        try:
            return await self._run(namespace, model, work)  # type: ignore[no-any-return]
        except _QueueMissing:
            return None

    async def delete(self, namespace: str, model: str) -> None:
        """Removes the model's queues, with any messages left in them. Without a RabbitMQ URL no queue was
        ever declared: nothing to remove."""
        if not self.amqp_url:
            return
        def work(channel: Any) -> None:
            channel.queue_delete(queues.request_queue(namespace, model))
            channel.queue_delete(queues.dead_letter_queue(namespace, model))
        await self._run(namespace, model, work)

    # -- management API -------------------------------------------------------------------------
    def _vhost(self) -> str:
        path = urlsplit(self.amqp_url or "").path
        return unquote(path[1:]) if len(path) > 1 else "/"

    async def _request(self, path: str) -> Any:
        if not self.api_url:
            raise BrokerUnavailable("no RabbitMQ management URL configured (KUBELM_RABBITMQ_API_URL)")
        parts = urlsplit(self.api_url)
        if self._http is None:
            auth = aiohttp.encode_basic_auth(unquote(parts.username or "guest"), unquote(parts.password or "guest"))
            self._http = aiohttp.ClientSession(headers={"Authorization": auth},
                                               timeout=aiohttp.ClientTimeout(total=self._timeout))
        base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        try:
            async with self._http.get(base + path) as response:
                if response.status == 404:
                    return None
                if response.status >= 400:
                    raise BrokerUnavailable(f"RabbitMQ management API: {response.status} {await response.text()}")
                return await response.json()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise BrokerUnavailable(f"RabbitMQ management API: {type(e).__name__}: {e}") from e

    async def _get(self, path: str) -> dict[str, Any] | None:
        found = await self._request(path)
        return dict(found) if found is not None else None

    async def _get_list(self, path: str) -> list[dict[str, Any]]:
        return list(await self._request(path) or [])

    async def _all_queues(self, max_age: float) -> dict[str, dict[str, Any]]:
        """Every queue of the vhost in one request, shared by all models for `max_age` seconds: one call
        per tick instead of two per model."""
        # One request at a time (whoever waits takes its answer), and a failure is remembered for a while:
        # with the API slow or down, each model's reconciliation fails at once instead of queueing behind it.
        async with self._stats_lock:
            now = asyncio.get_running_loop().time()
            if self._stats_failed is not None and now - self._stats_failed[0] < max(max_age, FAILURE_CACHE_SECONDS):
                raise BrokerUnavailable(f"{self._stats_failed[1]} (not asked again for a few seconds)")
            if self._stats is None or now - self._stats[0] > max_age:
                vhost = quote(self._vhost(), safe="")
                try:
                    listed = await self._get_list(f"/api/queues/{vhost}?columns={STATS_COLUMNS}")
                except BrokerUnavailable as e:
                    self._stats_failed = (asyncio.get_running_loop().time(), str(e))
                    raise
                self._stats, self._stats_failed = (now, {str(q.get("name")): q for q in listed}), None
            return self._stats[1]

    async def stats(self, namespace: str, model: str, max_age: float = 2.0) -> QueueStats | None:
        """The request queue's figures, or None when it does not exist. RabbitMQ refreshes them every
        `collect_statistics_interval` (5 s by default), so a listing younger than `max_age` is as good as a
        new one; each listing of a few hundred queues costs the broker tens of milliseconds."""
        found_all = await self._all_queues(max_age)
        name = queues.request_queue(namespace, model)
        found = found_all.get(name)
        if found is None:
            return None
        dead = found_all.get(queues.dead_letter_queue(namespace, model)) or {}
        rates = found.get("message_stats") or {}
        return QueueStats(
            name=name,
            ready=int(found.get("messages_ready") or 0),
            unacked=int(found.get("messages_unacknowledged") or 0),
            consumers=int(found.get("consumers") or 0),
            dead_lettered=int(dead.get("messages") or 0),
            publish_rate=float((rates.get("publish_details") or {}).get("rate") or 0.0),
            deliver_rate=float((rates.get("deliver_get_details") or {}).get("rate") or 0.0),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        loop = asyncio.get_running_loop()
        if self.amqp_url:
            await asyncio.gather(*(loop.run_in_executor(lane.executor, lane.close) for lane in self._lanes))
        for lane in self._lanes:
            lane.executor.shutdown(wait=False)


def request(amqp_url: str, queue_name: str, body: bytes, correlation_id: str, timeout: float) -> bytes:
    """Publishes one request to a model's queue and waits for its reply (the `kubelm generate` path when no
    gateway runs). The reply comes over RabbitMQ's direct reply-to, so no queue is left behind; the message
    expires with the timeout, so a request nobody waits for any more is never served."""
    try:
        parameters = pika.URLParameters(amqp_url)
        parameters.socket_timeout = parameters.blocked_connection_timeout = min(timeout, 30.0)
        connection = pika.BlockingConnection(parameters)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise BrokerUnavailable(f"RabbitMQ at {_safe(amqp_url)}: {type(e).__name__}: {e}") from e
    replies: list[bytes] = []
    try:
        channel = connection.channel()
        channel.confirm_delivery()

        def on_reply(_channel: Any, _method: Any, properties: Any, reply: bytes) -> None:
            if properties.correlation_id == correlation_id and properties.type != protocol.CHUNK_TYPE:
                replies.append(reply)

        channel.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
        try:
            channel.basic_publish("", queue_name, body, pika.BasicProperties(
                reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id, delivery_mode=2,
                content_type="application/json", expiration=str(max(1, int(timeout * 1000))),
                headers={queues.SENT_AT_HEADER: int(time.time() * 1000)}), mandatory=True)
        except pika.exceptions.UnroutableError as e:
            raise BrokerUnavailable(f"queue {queue_name} does not exist") from e
        deadline = time.monotonic() + timeout
        while not replies and time.monotonic() < deadline:
            connection.process_data_events(time_limit=min(1.0, max(0.0, deadline - time.monotonic())))
        if not replies:
            raise TimeoutError(f"no reply from {queue_name} within {timeout:g} s")
        return replies[0]
    except pika.exceptions.ChannelClosedByBroker as e:
        raise BrokerUnavailable(f"RabbitMQ refused: {e.reply_code} {e.reply_text}") from e
    finally:
        if connection.is_open:
            connection.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
