"""`kubelm-runtime serve`: a queue-fed inference worker with dynamic batching.

Each delivery is validated as it arrives; bad ones get an error reply and are
dead-lettered with the reason, deterministic ones may be answered from the
response cache, the rest wait in the batcher. Batching is continuous: waiting
requests join the running batch between decode steps, and each is answered as
soon as its last prompt finishes. A request is acknowledged only after its reply
was confirmed by the broker, so a crash loses nothing (the broker redelivers) and
SIGTERM drains: consuming stops, what was delivered is finished and acknowledged,
and the process exits 0.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubelm_contract import env, keys, protocol, queues, registry
from kubelm_contract.protocol import ProtocolError, Reply, Request

from .. import allocator, artifacts, models
from ..broker import ConnectionLost, Delivery, WorkerChannel
from ..memcached_store import OptionalMemcached
from ..redis_store import OptionalRedis, RedisStore
from . import chat, response_cache
from .batching import Batcher
from .engine import Batch, Engine, Item, Output, Streamable
from .health import HealthState, WorkerMetrics, serve_health
from .settings import ServeConfig

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BATCH_FAILURES = 3
"""Batches failing in a row before /livez fails: the loop runs, but the worker only dead-letters."""
REGISTER_RETRY_SECONDS = 5.0
RECONNECT_FIRST_DELAY_SECONDS, RECONNECT_MAX_DELAY_SECONDS = 0.5, 10.0
REPLIED_REMEMBERED = 10_000


@dataclass
class Pending:
    delivery: Delivery
    request: Request
    material: list[str] | None
    """Response-cache key material per row (`n` per prompt); None when not cacheable."""
    prompt_ids: list[tuple[int, ...]]
    """Each prompt's token ids, encoded once for the length check and reused by the prefill."""


@dataclass
class InFlight:
    """A request in the running batch: one output slot per prompt, filled as its rows finish."""
    pending: Pending
    outputs: list[Output | None]
    admitted: float
    admitted_wall: float
    batch_size: int = 0
    """Rows decoding together right after it joined."""
    sent: list[int] = field(init=False)
    """Characters of each row's text already streamed."""
    sent_tokens: list[int] = field(init=False)
    """Tokens of each row whose log-probabilities were streamed."""
    ended: set[int] = field(init=False)
    """Rows whose end was streamed (their finish reason) while others of the request went on."""

    def __post_init__(self) -> None:
        self.sent = [0] * len(self.outputs)
        self.sent_tokens = [0] * len(self.outputs)
        self.ended = set()

    def rows(self, key: int) -> set[tuple[int, int]]:
        """The engine's keys of this request's rows, `key` being the request's in the running batch."""
        return {(key, index) for index in range(len(self.outputs))}


def _positive_int(value: Any, default: int) -> int:
    """A header's whole number of seconds, or `default` when a publisher sent none or nonsense."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _reply_key(delivery: Delivery) -> str:
    return f"{delivery.correlation_id}|{delivery.reply_to}"


def _remember(seen: OrderedDict[str, None], key: str) -> None:
    """Adds `key`, forgetting the oldest past REPLIED_REMEMBERED."""
    seen[key] = None
    if len(seen) > REPLIED_REMEMBERED:
        seen.popitem(last=False)


def model_digest(reference: str, source_description: str) -> str:
    """The content digest for cache keys: from the artifact manifest when there is one."""
    manifest = Path(reference) / artifacts.MANIFEST_FILE
    if manifest.exists():
        return str(json.loads(manifest.read_text())["digest"])
    return registry.source_digest(source_description)


class Worker:
    def __init__(self, config: ServeConfig, amqp_url: str, redis_url: str | None, engine: Engine, digest: str,
                 metrics: WorkerMetrics | None = None, health: HealthState | None = None,
                 memcached_url: str | None = None):
        self.config = config
        self.engine = engine
        self.digest = digest
        self.defaults = config.generation.decoding()
        self.limits = config.limits.limits()
        self.chat_template = chat.template_for(engine.tokenizer, config.generation.chat_template)
        self.redis = OptionalRedis(redis_url, "the response cache", retry_after=config.redis_retry_seconds)
        self.responses = response_cache.ResponseCache(self.redis, self._memcached(memcached_url))
        self.metrics = metrics or WorkerMetrics()
        self.health = health or HealthState(config.liveness_timeout_seconds)
        self.batcher: Batcher[Pending] = Batcher(config.batching.max_batch_size,
                                                 config.batching.max_wait_millis / 1000)
        self.amqp_url = amqp_url
        self.channel = self._connect()
        self.queue = self.channel.declare(config.namespace, config.name, config.queue)
        self.dead_letter_key = queues.dead_letter_queue(config.namespace, config.name)
        self.in_flight: dict[int, InFlight] = {}
        """Requests admitted to the running batch, by id of their Pending."""
        self.batch = Batch()
        self.draining = False
        self.failures = 0
        """Batches failed in a row (prefill or decode)."""
        self.registered = False
        self.register_tried = 0.0
        self.replied: OrderedDict[str, None] = OrderedDict()
        """Replies that went out (request id and reply address), most recent last: a redelivery of one (its ack
        was lost with the connection) is acknowledged without a second reply. The address is part of the key:
        a gateway that lost its reply channel sends the request again with a new one, and that copy is answered."""
        self.model_id = keys.model_id(config.namespace, config.name)
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        """Requests whose caller went away, most recent last: skipped if delivered (again)."""

    def _memcached(self, url: str | None) -> OptionalMemcached | None:
        if self.config.cache.responses.backend != "memcached":
            return None
        if not url:
            log.warning("cache.responses.backend is memcached but %s is not set: serving without the response "
                        "cache", env.MEMCACHED_URL)
        # Unconfigured, it answers every lookup with "unavailable": no hits, no entries, nothing in Redis.
        return OptionalMemcached(url, "the response cache", retry_after=self.config.redis_retry_seconds)

    def _connect(self) -> WorkerChannel:
        return WorkerChannel(self.amqp_url, prefetch=2 * self.config.batching.max_batch_size,
                             name=f"kubelm-serve {self.config.namespace}/{self.config.name}")

    # -- deliveries -----------------------------------------------------------------------------
    def on_delivery(self, delivery: Delivery) -> None:
        if delivery.redelivered:
            self.metrics.redelivered.inc()
            if _reply_key(delivery) in self.replied:
                log.info("request %s was answered before the connection was lost: acknowledged, not answered "
                         "again", delivery.correlation_id)
                self.channel.ack(delivery.tag)
                return
        sent_at = delivery.headers.get(queues.SENT_AT_HEADER)
        if isinstance(sent_at, int | float):
            self.metrics.queue_wait.observe(max(0.0, delivery.received - float(sent_at) / 1000))
        request_id = delivery.correlation_id or "unknown"
        try:
            request = protocol.parse_request(delivery.body, self.defaults, self.limits)
            request_id = request.id
            if request.expired():
                raise ProtocolError(protocol.EXPIRED, "the request's deadline passed before it was served")
            if request.messages:
                request = protocol.with_prompt(request, chat.render(self.engine.tokenizer, self.chat_template,
                                                                    request.messages))
            prompt_ids = [self.engine.encode(prompt) for prompt in request.prompts]
            for ids in prompt_ids:
                if len(ids) > self.limits.max_input_tokens:
                    raise ProtocolError(protocol.PROMPT_TOO_LONG, f"prompt has {len(ids)} tokens; this model accepts "
                                                                  f"at most {self.limits.max_input_tokens}")
        except ProtocolError as e:
            self._refuse(delivery, request_id, e.kind, str(e))
            return
        except Exception as e:  # a request this code did not foresee fails alone, answered, not the worker
            log.exception("request %s could not be read", request_id)
            self._refuse(delivery, request_id, protocol.INTERNAL,
                         f"the worker could not read the request: {type(e).__name__}: {e}")
            return
        if request.id in self.cancelled:
            log.info("request %s was cancelled by its caller before it was delivered: skipped", request.id)
            self._drop_cancelled(delivery)
            return
        material = (response_cache.materials(self.digest, request)
                    if self.config.cache.responses.enabled else None)
        checked = bool(delivery.headers.get(queues.CACHE_CHECKED_HEADER))
        cached = self.responses.lookup(self.model_id, material) if material and not checked else None
        if material and not checked:
            self.metrics.cache.labels("hit" if cached else "miss").inc()
        if cached is not None:
            if self._answer(delivery, Reply(id=request.id, choices=cached, cached=True, model=self.config.name,
                                           n=request.n), chat=bool(request.messages)):
                self.metrics.requests.labels("cached").inc()
            return
        self.batcher.add(Pending(delivery, request, material, prompt_ids), time.monotonic())

    def on_cancel(self, request_id: str) -> None:
        """The caller went away (a gateway's client disconnected): the request's rows leave the batch before
        the next step, or it leaves the waiting line, unanswered and acknowledged; one not here yet is
        skipped when it comes (it may be another worker's, or come back redelivered)."""
        _remember(self.cancelled, request_id)
        for flight in self._take_out(lambda flight: flight.pending.request.id == request_id):
            log.info("request %s cancelled by its caller after %.1fs of decoding", request_id,
                     time.monotonic() - flight.admitted)
            self._drop_cancelled(flight.pending.delivery)
        for pending in self.batcher.remove(lambda pending: pending.request.id == request_id):
            log.info("request %s cancelled by its caller while it waited for a batch", request_id)
            self._drop_cancelled(pending.delivery)

    def _drop_cancelled(self, delivery: Delivery) -> None:
        self._before_ack()
        self.channel.ack(delivery.tag)
        self.metrics.requests.labels("cancelled").inc()

    def _refuse(self, delivery: Delivery, request_id: str, kind: str, message: str) -> None:
        log.info("refusing request %s: %s: %s", request_id, kind, message)
        reply = protocol.error_reply(request_id, kind, message)
        if delivery.reply_to:
            self.channel.reply(delivery.reply_to, delivery.correlation_id, reply.to_json())
            self._replied(delivery)
        self._store_result(delivery, reply)
        self._before_ack()
        self.channel.dead_letter(delivery, self.dead_letter_key, kind, message)
        self.metrics.errors.labels(kind).inc()
        self.metrics.requests.labels("error").inc()

    def _before_ack(self) -> None:
        """Once draining, stop consuming before the next ack: an ack frees prefetch credit, and a message
        the broker sends on it while the cancel is under way would be handed back (redelivered)."""
        if self.draining and self.channel.consumer_tag is not None:
            log.info("draining: no new requests; finishing %d delivered", len(self.batcher))
            self.health.ready = False
            self.channel.stop_consuming()

    def _answer(self, delivery: Delivery, reply: Reply, chat: bool = False) -> bool:
        """Reply (confirmed), store an asynchronous result, then acknowledge: at least once, never lost.
        False when the request was dead-lettered instead (counted as an error here)."""
        self._before_ack()
        if delivery.reply_to:
            self.channel.reply(delivery.reply_to, delivery.correlation_id, reply.to_json())
            self._replied(delivery)
        if self._store_result(delivery, reply, chat):
            self.channel.ack(delivery.tag)
            return True
        # An asynchronous result that cannot be stored would be lost: keep the request instead.
        self.channel.dead_letter(delivery, self.dead_letter_key, protocol.UNAVAILABLE,
                                 "the result could not be stored: Redis is unavailable")
        self.metrics.errors.labels(protocol.UNAVAILABLE).inc()
        self.metrics.requests.labels("error").inc()
        return False

    def _replied(self, delivery: Delivery) -> None:
        if delivery.correlation_id:
            _remember(self.replied, _reply_key(delivery))

    def _store_result(self, delivery: Delivery, reply: Reply, chat: bool = False) -> bool:
        """Stores the reply of an asynchronous request; False only when that was asked for and failed.
        `chat`: the request was a conversation, whose result the gateway shows as a chat completion."""
        key = delivery.headers.get(queues.RESULT_KEY_HEADER)
        if isinstance(key, bytes):
            key = key.decode()
        if not (isinstance(key, str) and key.startswith(keys.PREFIX)):
            return True
        ttl = _positive_int(delivery.headers.get(queues.RESULT_TTL_HEADER), 3600)
        document = protocol.result_document(reply, chat)

        def put(store: RedisStore) -> bool:
            store.set_json(key, document, ttl)
            return True

        return self.redis.call(put, False, force=True)

    # -- continuous batching ---------------------------------------------------------------------
    def admit(self, now: float) -> None:
        """Moves waiting requests into the running batch while it has room (the engine prefills them)."""
        room = self.config.batching.max_batch_size - len(self.in_flight)
        if room <= 0 or not len(self.batcher):
            return
        # A prompt shared by a request's n rows is prefilled once: it costs its tokens once.
        admitted = self.batcher.take(now, limit=room, budget=self.config.batching.max_prefill_tokens or 0,
                                     cost=lambda pending: sum(len(ids) for ids in pending.prompt_ids))
        started_wall = time.time()
        entries = []
        for pending in admitted:
            self.metrics.batch_wait.observe(max(0.0, started_wall - pending.delivery.received))
            samples = pending.request.samples()  # n rows per prompt; the engine prefills a prompt once
            row_ids = [ids for ids in pending.prompt_ids for _ in range(pending.request.n)]
            self.in_flight[id(pending)] = InFlight(pending, [None] * len(samples), now, started_wall)
            entries += [((id(pending), i), Item(prompt, decoding, ids))
                        for i, ((prompt, decoding), ids) in enumerate(zip(samples, row_ids, strict=True))]
        try:
            self.engine.join(self.batch, entries)
        except Exception as e:  # a failed prefill fails what is in the batch, not the worker
            self._fail_batch(e)
            return
        for pending in admitted:
            self.in_flight[id(pending)].batch_size = len(self.batch)

    def step(self) -> None:
        """One decode step. The tokens are picked first: requests whose every row finished are answered and
        the new text is streamed before the model runs on them, a forward pass sooner than after it."""
        self.metrics.batch_size.observe(len(self.batch))
        try:
            finished = self.engine.choose(self.batch)
        except Exception as e:
            self._fail_batch(e)
            return
        for (key, index), output in finished:
            # Answering one request may let the connection deliver a cancel that takes out another.
            flight = self.in_flight.get(key)
            if flight is None:
                continue
            flight.outputs[index] = output
            if all(o is not None for o in flight.outputs):
                del self.in_flight[key]
                self._finish(flight)
        self._stream()
        try:
            self.engine.forward(self.batch)
        except Exception as e:
            self._fail_batch(e)
            return
        self.failures = 0  # a decode step went through: the failures were not in a row

    def _stream(self) -> None:
        """Sends the text streaming requests generated in this step, for the rows with new text (finished
        requests get their reply, which holds it all): one message per reply address — a gateway connection
        carries many requests —, a grouped one when several requests share it."""
        streaming = {key for key, flight in self.in_flight.items()
                     if flight.pending.request.stream and flight.pending.delivery.reply_to}
        if not streaming:
            return
        ready = self.engine.streamable_texts(self.batch, lambda row_key: row_key[0] in streaming)
        by_address: dict[str, list[tuple[InFlight, dict[int, protocol.ChunkPart]]]] = {}
        for key in streaming:
            flight = self.in_flight.get(key)
            if flight is None:
                continue
            new: dict[int, protocol.ChunkPart] = {}
            for index, output in enumerate(flight.outputs):
                part = Streamable(output.text, output.logprobs) if output is not None else ready.get((key, index))
                if part is None:
                    continue
                text_at, tokens_at = flight.sent[index], flight.sent_tokens[index]
                logprobs = part.logprobs[tokens_at:] if part.logprobs is not None else ()
                # A row that finished before its request's other rows: its end goes out now, as OpenAI
                # streams each choice's finish reason when that choice ends.
                ending = output.finish_reason if output is not None and index not in flight.ended else None
                if len(part.text) > text_at or logprobs or ending:
                    new[index] = protocol.ChunkPart(text_at, part.text[text_at:], tokens_at, logprobs, ending)
                    flight.sent[index], flight.sent_tokens[index] = len(part.text), tokens_at + len(logprobs)
                    if ending:
                        flight.ended.add(index)
            if new:
                by_address.setdefault(str(flight.pending.delivery.reply_to), []).append((flight, new))
        for address, found in by_address.items():
            grouped = {str(f.pending.delivery.correlation_id): parts for f, parts in found
                       if f.pending.delivery.correlation_id}
            if len(grouped) > 1:
                self.channel.send_chunk(address, protocol.chunks_message(grouped), grouped=True)
                self.metrics.stream_messages.labels("grouped").inc()
                found = [(f, parts) for f, parts in found if not f.pending.delivery.correlation_id]
            for flight, parts in found:
                self.channel.send_chunk(address, protocol.chunk_message(flight.pending.request.id, parts),
                                        flight.pending.delivery.correlation_id)
                self.metrics.stream_messages.labels("request").inc()

    def drop_expired(self) -> None:
        """A request past its deadline leaves the batch before the next step: its caller has stopped
        waiting (the gateway answered 504 at the same deadline), so every further token would be wasted.
        It is refused as expired (dead-lettered), like one that expired before it was served."""
        now = time.time()
        for flight in self._take_out(lambda flight: flight.pending.request.expired(now)):
            self._refuse(flight.pending.delivery, flight.pending.request.id, protocol.EXPIRED,
                         f"the request's deadline passed while it was being decoded (after "
                         f"{time.monotonic() - flight.admitted:.1f}s); decoding stopped")

    def _take_out(self, leaving: Callable[[InFlight], bool]) -> list[InFlight]:
        """Takes the requests that are `leaving` out of the running batch (their rows are not decoded again)."""
        keys = [key for key, flight in self.in_flight.items() if leaving(flight)]
        self.engine.cancel(self.batch, {row for key in keys for row in self.in_flight[key].rows(key)})
        return [self.in_flight.pop(key) for key in keys]

    def _finish(self, flight: InFlight) -> None:
        pending, outputs = flight.pending, [o for o in flight.outputs if o is not None]
        elapsed = time.monotonic() - flight.admitted
        self.metrics.generation.observe(elapsed)
        self.metrics.tokens.inc(sum(o.completion_tokens for o in outputs))
        self.metrics.prompt_tokens.inc(sum(o.prompt_tokens for o in outputs))
        choices = tuple(protocol.Choice(o.text, o.finish_reason, o.prompt_tokens, o.completion_tokens, o.logprobs,
                                        o.prompt_logprobs) for o in outputs)
        reply = Reply(id=pending.request.id, choices=choices, model=self.config.name, n=pending.request.n, timings={
            "batch_wait_ms": round((flight.admitted_wall - pending.delivery.received) * 1000, 3),
            "generate_ms": round(elapsed * 1000, 3), "batch_size": flight.batch_size})
        # Cached before the reply goes out: a client that repeats the request once it has the answer must
        # find the entry (stored after, the repeat could overtake it and be generated again).
        # A greedy request's n rows share one key: stored once.
        for material, choice in dict(zip(pending.material or (), choices, strict=False)).items():
            self.responses.store(self.model_id, material, choice, self.config.cache.responses.ttl_seconds)
        if not self._answer(pending.delivery, reply, chat=bool(pending.request.messages)):
            return
        self.metrics.requests.labels("ok").inc()
        self._observe_latency(flight, outputs)

    def _observe_latency(self, flight: InFlight, outputs: list[Output]) -> None:
        """Time to first token and between tokens, as vLLM reports them; delivery is in wall time,
        the rest in monotonic time from when the request joined the batch."""
        waited = max(0.0, flight.admitted_wall - flight.pending.delivery.received)
        firsts = [o.first_token_at for o in outputs if o.first_token_at is not None]
        if firsts:
            self.metrics.first_token.observe(waited + min(firsts) - flight.admitted)
        for output in outputs:
            if output.first_token_at is not None and output.finished_at is not None and output.completion_tokens > 1:
                self.metrics.per_token.observe((output.finished_at - output.first_token_at)
                                               / (output.completion_tokens - 1))
        self.metrics.duration.observe(waited + time.monotonic() - flight.admitted)

    def _fail_batch(self, error: Exception) -> None:
        log.exception("generation failed for %d requests", len(self.in_flight), exc_info=error)
        flights, self.in_flight, self.batch = list(self.in_flight.values()), {}, Batch()
        for flight in flights:
            self._refuse(flight.pending.delivery, flight.pending.request.id, protocol.INTERNAL,
                         f"{type(error).__name__}: {error}")
        self.failures += 1
        if self.failures >= MAX_CONSECUTIVE_BATCH_FAILURES and self.health.failing is None:
            self._give_up(f"{self.failures} batches failed in a row, the last with {type(error).__name__}: {error}")

    def _give_up(self, reason: str) -> None:
        """Stops taking requests and fails liveness: a restart may help (a wedged device, corrupt state), and
        staying up would only dead-letter the queue. What waits here goes back to the queue for other workers."""
        log.error("no longer serving, liveness fails until restarted: %s", reason)
        self.health.failing, self.health.ready = reason, False
        self.channel.stop_consuming()
        while len(self.batcher):
            for pending in self.batcher.take(time.monotonic()):
                self.channel.requeue(pending.delivery.tag)

    # -- main loop ------------------------------------------------------------------------------
    def register(self) -> bool:
        """Writes the model's routing entry for the gateways; False while Redis cannot take it."""
        self.register_tried = time.monotonic()
        entry = registry.model_entry(queue=self.queue, namespace=self.config.namespace, digest=self.digest,
                                     source=self.config.model.describe(), limits=self.limits,
                                     defaults=self.defaults, response_cache=self.config.cache.responses.enabled,
                                     response_cache_backend=self.config.cache.responses.backend)

        def write(store: RedisStore) -> bool:
            store.hset_json(keys.MODEL_REGISTRY, self.model_id, entry)
            return True

        self.registered = self.redis.call(write, False, force=True)
        return self.registered

    def _register_again_if_due(self, now: float) -> None:
        """Redis was down when the worker started (or lost the entry's write): try again now and then, so
        the model reaches the gateways' routing table once Redis is back."""
        due = now - self.register_tried >= REGISTER_RETRY_SECONDS
        if not self.registered and self.redis.store is not None and due and self.register():
            log.info("registered %s with the model registry", self.model_id)

    def run(self) -> None:
        self.channel.consume_cancels(self.queue, self.on_cancel)
        self.channel.consume(self.queue, self.on_delivery)
        self.register()
        self.health.ready = True
        log.info("serving %s from queue %s (batches of up to %d, %d ms wait)", self.config.name, self.queue,
                 self.config.batching.max_batch_size, self.config.batching.max_wait_millis)
        while True:
            try:
                if not self._turn():
                    break
            except ConnectionLost as e:
                if not self._reconnect(e):
                    break
        if self.channel.unacked:
            log.error("stopping with %d unacknowledged deliveries; the broker will redeliver them",
                      len(self.channel.unacked))
        self.channel.close()
        log.info("drained and stopped")

    def _turn(self) -> bool:
        """One turn of the loop; False once drained."""
        self.health.tick()
        self._before_ack()
        now = time.monotonic()
        self._register_again_if_due(now)
        if self.in_flight:
            # Decoding: whoever arrived during the last step joins now instead of waiting for the batch.
            self.channel.wait(0)
            self.drop_expired()
            self.admit(now)
            if self.in_flight:  # none left when every request in the batch expired
                self.step()
            return True
        if self.batcher.ready(now) or (self.draining and len(self.batcher)):
            self.admit(now)
            if self.in_flight:  # their first tokens now, before anything else is admitted and prefilled
                self.step()
            return True
        if self.draining:
            self.channel.wait(0)  # dispatch anything that arrived before the cancel completed
            return bool(len(self.batcher))
        left = self.batcher.time_left(now)
        self.channel.wait(0.5 if left is None else left)
        return True

    def _reconnect(self, error: ConnectionLost) -> bool:
        """After a lost connection: what this worker held is back in the queue (the broker requeues every
        unacknowledged delivery), so the running batch and the waiting requests are dropped, and the worker
        connects again with backoff, model still loaded, and consumes again. False when it was draining:
        then nothing is left to finish."""
        log.warning("lost the connection to RabbitMQ (%s): %d requests in the batch and %d waiting go back to "
                    "the queue; connecting again", error, len(self.in_flight), len(self.batcher))
        self.health.ready = False
        self.in_flight, self.batch = {}, Batch()
        while len(self.batcher):
            self.batcher.take(time.monotonic())
        self.channel.close()
        delay = RECONNECT_FIRST_DELAY_SECONDS
        while not self.draining:
            self.health.tick()  # the loop is alive: waiting for the broker is no reason to be restarted
            try:
                channel = self._connect()
                self.queue = channel.declare(self.config.namespace, self.config.name, self.config.queue)
                channel.consume_cancels(self.queue, self.on_cancel)
                if self.health.failing is None:
                    channel.consume(self.queue, self.on_delivery)
            except ConnectionLost as e:
                log.warning("RabbitMQ not reachable (%s); trying again in %.1fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY_SECONDS)
                continue
            self.channel = channel
            self.health.ready = self.health.failing is None
            log.info("connected to RabbitMQ again; serving from %s", self.queue)
            return True
        return False


def run(config: ServeConfig, amqp_url: str, redis_url: str | None) -> None:
    # Health first: liveness holds while a large model loads; readiness waits for the consumer.
    metrics, health = WorkerMetrics(), HealthState(config.liveness_timeout_seconds)
    server = serve_health(config.health_port, health, metrics)
    store = RedisStore(redis_url, timeout=30) if redis_url else None
    try:
        reference, revision = models.resolve(config.model, store, Path(config.cache_dir))
        engine = Engine.load(reference, revision, config.model.tokenizer, config.device, config.dtype,
                             batch_hint=config.batching.max_batch_size)
    except Exception as e:
        server.shutdown()
        raise models.load_failure(e, config.model.describe()) from e
    allocator.report(cpu=engine.device.type == "cpu")
    # torch and transformers leave ~400k long-lived objects, and a full collection walks them all
    # (0.1-0.2 s, a stall in the middle of a decode step); frozen, the collector no longer visits them.
    gc.collect()
    gc.freeze()
    worker = Worker(config, amqp_url, redis_url, engine, model_digest(reference, config.model.describe()),
                    metrics, health, memcached_url=os.environ.get(env.MEMCACHED_URL))

    def drain(signum: int, frame: Any) -> None:
        worker.draining = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    try:
        worker.run()
    finally:
        server.shutdown()
