"""The gateway's serving layer: from a parsed OpenAI request to its answer, with no HTTP in it.

Its two outside parts come in as small interfaces — a `Dispatcher` (the broker's RPC pool) and a
`GatewayStore` (the model registry, the response cache and asynchronous results) — so it runs on
in-memory fakes in unit tests and on RabbitMQ and Redis in the gateway. Refusals are `ApiError`s
in OpenAI's shape; the routes only turn them into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from kubelm_contract import keys, protocol, queues
from kubelm_contract.protocol import Choice, Decoding, Limits, ProtocolError

from ..broker import BrokerError, NoSuchQueue, QueueFull, new_request_id
from ..memcached_store import OptionalMemcached
from ..redis_store import AsyncOptionalRedis, AsyncRedisStore
from . import openai_api, response_cache
from .openai_api import ApiError, ChatCompletionRequest, CompletionRequest
from .settings import GatewayConfig

log = logging.getLogger(__name__)
ROUTE_TTL = 2.0
Asked = CompletionRequest | ChatCompletionRequest


class Dispatcher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def call(self, queue_name: str, body: bytes, correlation_id: str, timeout: float,
                   headers: dict[str, Any] | None = None,
                   on_chunk: Callable[[dict[int, protocol.ChunkPart]], None] | None = None) -> bytes: ...

    async def send(self, queue_name: str, body: bytes, correlation_id: str, expiration_seconds: float,
                   headers: dict[str, Any] | None = None) -> None: ...

    async def cancel(self, queue_name: str, correlation_id: str) -> None: ...


class GatewayStore(Protocol):
    """What the gateway keeps in Redis. Every call answers a default while Redis is unreachable."""

    @property
    def available(self) -> bool: ...

    async def registry(self) -> dict[str, dict[str, Any]]: ...

    async def registry_entry(self, model_id: str) -> dict[str, Any] | None: ...

    async def cached_choices(self, model_id: str, material: list[str],
                             backend: str = "redis") -> tuple[Choice, ...] | None: ...

    def looks_up(self, backend: str) -> bool:
        """Whether the last lookups in the response cache's `backend` really reached it (a miss then
        means: not cached, and the worker need not look again)."""

    async def put_result(self, key: str, document: dict[str, Any], ttl_seconds: int) -> bool: ...

    async def result(self, key: str) -> dict[str, Any] | None: ...


class RedisGatewayStore:
    """The GatewayStore on Redis, through redis.asyncio: a slow or silent Redis holds up the requests
    that need it, never the event loop and every other connection of the gateway. Response-cache entries
    of models whose backend is memcached are looked up there (on a thread: pymemcache blocks)."""

    def __init__(self, redis_url: str | None, memcached_url: str | None = None):
        self.redis = AsyncOptionalRedis(redis_url, "the model registry and asynchronous results", retry_after=5)
        self.memcached = OptionalMemcached(memcached_url, "the response cache", retry_after=5) \
            if memcached_url else None

    @property
    def available(self) -> bool:
        return self.redis.available

    async def registry(self) -> dict[str, dict[str, Any]]:
        return await self.redis.call(lambda store: store.hgetall_json(keys.MODEL_REGISTRY), {})

    async def registry_entry(self, model_id: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = await self.redis.call(
            lambda store: store.hget_json(keys.MODEL_REGISTRY, model_id), None)
        return entry

    def looks_up(self, backend: str) -> bool:
        if backend == "memcached":
            return self.memcached is not None and self.memcached.available
        return self.redis.available

    async def cached_choices(self, model_id: str, material: list[str],
                             backend: str = "redis") -> tuple[Choice, ...] | None:
        if backend == "memcached":
            if self.memcached is None:
                return None
            return await response_cache.lookup_in_memcached_async(self.memcached, self.redis, model_id, material)
        return await response_cache.lookup_async(self.redis, model_id, material)

    async def put_result(self, key: str, document: dict[str, Any], ttl_seconds: int) -> bool:
        async def write(store: AsyncRedisStore) -> bool:
            await store.set_json(key, document, ttl_seconds)
            return True

        # Forced: a client asked for something only Redis can keep; try it now rather than refuse.
        return await self.redis.call(write, False, force=True)

    async def result(self, key: str) -> dict[str, Any] | None:
        stored: dict[str, Any] | None = await self.redis.call(lambda store: store.get_json(key), None, force=True)
        return stored


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kubelm_gateway_requests", "HTTP requests, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("kubelm_gateway_latency_seconds", "Completion latency", ["model"],
                                 registry=self.registry)
        self.first_token = Histogram("kubelm_gateway_time_to_first_token_seconds",
                                     "Streamed completions: time from the request to its first text", ["model"],
                                     registry=self.registry)


def broker_failure(error: BrokerError, model: str) -> ApiError:
    if isinstance(error, NoSuchQueue):
        return openai_api.unavailable(f"model {model!r} has no request queue yet")
    if isinstance(error, QueueFull):
        return openai_api.unavailable(f"model {model!r} is at its queue limit; retry later")
    return openai_api.unavailable(str(error))


def worker_defaults(entry: dict[str, Any]) -> Decoding:
    defaults = dict(entry.get("defaults") or {})
    defaults["stop"] = tuple(defaults.get("stop", ()))
    return Decoding(**defaults)


class CompletionService:
    def __init__(self, config: GatewayConfig, dispatcher: Dispatcher, store: GatewayStore,
                 metrics: GatewayMetrics | None = None):
        self.config = config
        self.dispatcher = dispatcher
        self.store = store
        self.metrics = metrics or GatewayMetrics()
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self._routes: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cancellations: set[asyncio.Task[None]] = set()

    # -- routing --------------------------------------------------------------------------------
    async def models(self) -> dict[str, dict[str, Any]]:
        known: dict[str, dict[str, Any]] = {
            name: {"queue": queues.request_queue(self.config.namespace, name)} for name in self.config.models}
        prefix = keys.model_id(self.config.namespace, "")
        registered = await self.store.registry()
        known.update({name[len(prefix):]: entry for name, entry in registered.items() if name.startswith(prefix)})
        return known

    async def route(self, model: str) -> dict[str, Any]:
        """The model's registry entry; a found entry is reused for ROUTE_TTL seconds (saves a Redis
        round trip per request; a worker re-registering with new settings is seen that much later)."""
        now = time.monotonic()
        remembered = self._routes.get(model)
        if remembered is not None and now - remembered[0] < ROUTE_TTL:
            return remembered[1]
        entry = await self.store.registry_entry(keys.model_id(self.config.namespace, model))
        if entry is None and model in self.config.models:
            entry = {"queue": queues.request_queue(self.config.namespace, model)}
        if entry is None:
            raise ApiError(404, f"model {model!r} does not exist", "invalid_request_error", "model_not_found")
        self._routes[model] = (now, entry)
        return entry

    def build(self, body: Asked, entry: dict[str, Any], request_id: str,
              deadline_seconds: float | None = None) -> protocol.Request:
        """The protocol request for `body`, refused here when the worker would refuse it; its deadline is
        `deadline_seconds` from now, by default the time a synchronous caller waits."""
        prompt_logprobs = isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None
        if prompt_logprobs and body.stream:
            raise openai_api.invalid("echo with logprobs is not streamed; ask for it without stream",
                                     protocol.INVALID_REQUEST)
        ceiling = min(self.config.max_tokens, int(entry.get("maxNewTokens", self.config.max_tokens)))
        if body.new_tokens is not None and body.new_tokens > ceiling:
            raise openai_api.invalid(f"max_tokens {body.new_tokens} is over this model's limit of {ceiling}",
                                     protocol.INVALID_REQUEST)
        params = {k: v for k, v in {
            "max_new_tokens": body.new_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "stop": body.stop,
            "seed": body.seed, "logprobs": body.top_logprobs, "prompt_logprobs": prompt_logprobs or None,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        }.items() if v is not None}
        # A chat request travels as its conversation: only the worker has the tokenizer and its template.
        conversation = body.conversation()
        asked: dict[str, Any] = {"messages": [{"role": r, "content": c} for r, c in conversation]} \
            if conversation is not None else \
            {"prompts": [body.prompt] if isinstance(body.prompt, str) else body.prompt}  # type: ignore[union-attr]
        # Only what the client set travels; parsing with the worker's registered defaults gives the
        # decoding the worker will use, and refuses here what the worker would refuse.
        deadline = time.time() + (self.config.request_timeout_seconds if deadline_seconds is None else deadline_seconds)
        raw = json.dumps({"v": protocol.VERSION, "id": request_id, **asked, "params": params,
                          "deadline": deadline, "model": body.model, "n": body.n, "stream": body.stream}).encode()
        try:
            return protocol.parse_request(raw, worker_defaults(entry), Limits(max_new_tokens=ceiling))
        except ProtocolError as e:
            raise openai_api.invalid(str(e), e.kind) from e

    async def _prepare(self, body: Asked, deadline_seconds: float | None = None) -> tuple[dict[str, Any],
                                                                                         protocol.Request]:
        entry = await self.route(body.model)
        return entry, self.build(body, entry, new_request_id(), deadline_seconds)

    async def cached(self, entry: dict[str, Any], message: protocol.Request) -> tuple[protocol.Reply | None, bool]:
        """(the reply from the response cache, whether the cache was really consulted): a hit needs no trip
        through the queue, and after a real miss the worker need not look again."""
        if not entry.get("responseCache") or "digest" not in entry:
            return None, False
        material = response_cache.materials(entry["digest"], message)
        if not material:
            return None, False
        backend = str(entry.get("responseCacheBackend", "redis"))
        choices = await self.store.cached_choices(keys.model_id(self.config.namespace, str(message.model)),
                                                  material, backend)
        if choices is None:
            return None, self.store.looks_up(backend)
        return protocol.Reply(id=message.id, choices=choices, cached=True, model=message.model, n=message.n), True

    # -- the API --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _through_the_queue(self, model: str) -> AsyncIterator[None]:
        """A concurrency slot for a call through the queue (429 when none is free), with the broker's
        failures turned into OpenAI's errors."""
        if self.slots.locked():
            raise ApiError(429, "too many requests in flight at this gateway; retry later", "rate_limit_error")
        async with self.slots:
            try:
                yield
            except TimeoutError:
                raise ApiError(504, f"no reply within {self.config.request_timeout_seconds:g}s; the request "
                                    "expires in the queue", "timeout_error") from None
            except BrokerError as e:
                raise broker_failure(e, model) from e

    @staticmethod
    def _headers(cache_checked: bool) -> dict[str, Any]:
        return {queues.SENT_AT_HEADER: int(time.time() * 1000), queues.CACHE_CHECKED_HEADER: int(cache_checked)}

    def _reply(self, raw: bytes, model: str, started: float) -> protocol.Reply:
        """The worker's reply, counted in the latency; its refusal raised as the client sees it."""
        reply = protocol.Reply.from_json(raw)
        self.metrics.latency.labels(model).observe(time.perf_counter() - started)
        if reply.error:
            raise openai_api.reply_error(*reply.error)
        return reply

    async def complete(self, body: Asked, client_gone: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """The completion (or chat completion) for `body`. `client_gone` returns once the client has gone
        away: the request is then cancelled at the workers (its decoding stops) and this ends with 499."""
        shape = _shape(body)
        entry, message = await self._prepare(body)
        hit, cache_checked = await self.cached(entry, message)
        if hit is not None:
            return shape.whole(_echoed(body, message, hit), body.model, int(time.time()))
        started = time.perf_counter()
        async with self._through_the_queue(body.model):
            call = self.dispatcher.call(entry["queue"], message.to_json(), message.id,
                                        self.config.request_timeout_seconds, self._headers(cache_checked))
            raw = await self._unless_gone(call, client_gone, entry["queue"], message.id)
        reply = _echoed(body, message, self._reply(raw, body.model, started))
        return shape.whole(reply, body.model, int(time.time()))

    async def stream(self, body: Asked) -> AsyncGenerator[dict[str, Any], None]:
        """The completion as OpenAI's stream events: text per choice as the worker generates it, each
        choice's finish reason, and the usage when asked for (then every other event has `"usage": null`,
        as OpenAI's do). A refusal before the first event is an ApiError like `complete`'s; the caller going
        away (the iteration closed or cancelled) cancels the request at the workers."""
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        async with contextlib.aclosing(self._events(body)) as events:  # closing this closes them at once
            async for event in events:
                if include_usage:
                    event.setdefault("usage", None)
                yield event

    async def _events(self, body: Asked) -> AsyncGenerator[dict[str, Any], None]:
        shape = _shape(body)
        entry, message = await self._prepare(body)
        created, model = int(time.time()), body.model
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        hit, cache_checked = await self.cached(entry, message)
        # The prompts first, as OpenAI streams them, but only once text follows: the first event starts the
        # HTTP answer, and a refusal before it (429, 503, a prompt too long) must stay an HTTP error.
        echo = [shape.chunk(message.id, model, created, index, message.prompts[index // message.n], first=True)
                for index in range(len(message.prompts) * message.n)] \
            if isinstance(body, CompletionRequest) and body.echo else []
        if hit is not None:
            for echoed in echo:
                yield echoed
            for index, choice in enumerate(hit.choices):
                yield shape.chunk(message.id, model, created, index, choice.text, choice.finish_reason, first=True)
            if include_usage:
                yield shape.usage(hit, model, created)
            return
        sent: dict[int, str] = {}
        ended: set[int] = set()
        """Choices whose end was streamed before the reply (a request's rows finish at different steps)."""
        logged: dict[int, tuple[protocol.TokenLogprob, ...]] = {}
        """Per choice, the tokens whose log-probabilities were streamed (when asked for)."""
        asked_logprobs = message.decoding.logprobs is not None

        def event(index: int, text: str, tokens: tuple[protocol.TokenLogprob, ...],
                  finish_reason: str | None = None) -> dict[str, Any]:
            before = logged.get(index, ())
            logged[index] = before + tokens
            first = index not in sent
            sent[index] = sent.get(index, "") + text
            return shape.chunk(message.id, model, created, index, text, finish_reason, first=first,
                               logprobs=tokens if asked_logprobs else None, before=before)

        started = time.perf_counter()
        async with self._through_the_queue(model):
            chunks: asyncio.Queue[dict[int, protocol.ChunkPart]] = asyncio.Queue()
            call = asyncio.ensure_future(self.dispatcher.call(
                entry["queue"], message.to_json(), message.id, self.config.request_timeout_seconds,
                self._headers(cache_checked), on_chunk=chunks.put_nowait))
            arrived: asyncio.Future[dict[int, protocol.ChunkPart]] | None = None
            try:
                while not (call.done() and chunks.empty()):  # chunks that came before the reply go first
                    if chunks.empty():
                        arrived = asyncio.ensure_future(chunks.get())
                        await asyncio.wait((call, arrived), return_when=asyncio.FIRST_COMPLETED)
                        if not arrived.done():
                            arrived.cancel()
                            continue
                        parts = arrived.result()
                    else:
                        parts = chunks.get_nowait()
                    for index, part in parts.items():
                        if index in ended:  # a chunk delivered twice
                            continue
                        fresh = _fresh(sent.get(index, ""), part.offset, part.text)
                        tokens = _fresh_tokens(len(logged.get(index, ())), part)
                        # An end counts only when nothing of the choice went missing before it (chunks are
                        # not confirmed); after a gap the reply brings the rest and the end.
                        whole = (part.offset <= len(sent.get(index, ""))
                                 and part.token_offset <= len(logged.get(index, ())))
                        finish = part.finish_reason if whole else None
                        if fresh or tokens or finish:
                            if not sent:
                                self.metrics.first_token.labels(model).observe(time.perf_counter() - started)
                            for echoed in echo:
                                yield echoed
                            echo = []
                            yield event(index, fresh, tokens, finish)
                            if finish:
                                ended.add(index)
                raw = call.result()
            finally:
                if arrived is not None:
                    arrived.cancel()
                if not call.done():  # the client went away (or the gateway stops): stop the work too
                    call.cancel()
                    self._cancel_at_workers(entry["queue"], message.id)
        reply = self._reply(raw, model, started)
        for echoed in echo:
            yield echoed
        for index, choice in enumerate(reply.choices):
            if index in ended:
                continue
            streamed = sent.get(index, "")
            rest = choice.text[len(streamed):] if choice.text.startswith(streamed) else ""
            yield event(index, rest, (choice.logprobs or ())[len(logged.get(index, ())):], choice.finish_reason)
        if include_usage:
            yield shape.usage(reply, model, created)

    async def _unless_gone(self, call: Awaitable[bytes], client_gone: Callable[[], Awaitable[None]] | None,
                           queue: str, request_id: str) -> bytes:
        """The reply, unless the client goes first (or this task is cancelled): then the workers are told."""
        if client_gone is None:
            return await call
        waiting, gone = asyncio.ensure_future(call), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            waiting.cancel()
            self._cancel_at_workers(queue, request_id)
            raise
        finally:
            gone.cancel()
        if not waiting.done():
            waiting.cancel()
            self._cancel_at_workers(queue, request_id)
            raise ApiError(499, "the client closed the connection before the reply", "client_closed_request")
        return waiting.result()

    def _cancel_at_workers(self, queue: str, request_id: str) -> None:
        """Sends the cancellation on its own task: whoever cancelled this one does not wait for it."""
        task = asyncio.get_running_loop().create_task(self.dispatcher.cancel(queue, request_id))
        self._cancellations.add(task)
        task.add_done_callback(self._cancellation_sent)

    def _cancellation_sent(self, task: asyncio.Task[None]) -> None:
        self._cancellations.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not cancel a request at the workers: %s", task.exception())

    async def submit(self, body: Asked) -> dict[str, Any]:
        """Queues the request (a completion or a chat) for an asynchronous answer, which the worker stores
        in Redis."""
        if body.stream:
            raise openai_api.invalid("an asynchronous request is not streamed; leave stream out")
        if isinstance(body, CompletionRequest) and body.echo:
            raise openai_api.invalid("echo is not kept with asynchronous results; ask /v1/completions for it")
        # Nobody waits on the connection: the request may wait and run as long as its result is kept.
        ttl = self.config.result_ttl_seconds
        entry, message = await self._prepare(body, deadline_seconds=ttl)
        result_key = keys.result(message.id)
        if not await self.store.put_result(result_key, {"status": "pending", "model": body.model}, ttl):
            raise openai_api.unavailable("asynchronous requests need Redis, which is unavailable")
        try:
            await self.dispatcher.send(entry["queue"], message.to_json(), message.id, ttl, {
                queues.RESULT_KEY_HEADER: result_key, queues.RESULT_TTL_HEADER: ttl,
                queues.SENT_AT_HEADER: int(time.time() * 1000)})
        except BrokerError as e:
            raise broker_failure(e, body.model) from e
        return {"id": message.id, "status": "pending", "model": body.model}

    async def result(self, request_id: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of an asynchronous request: 202 while pending, 200 once done or failed."""
        stored = await self.store.result(keys.result(request_id))
        if stored is None:
            raise ApiError(404, f"no request {request_id!r} (unknown, or its result expired)",
                           "invalid_request_error")
        if stored.get("status") != "done":
            return 202, {"id": request_id, "status": "pending"}
        reply = protocol.Reply.from_json(json.dumps(stored["reply"]))
        if reply.error:
            return 200, {"id": request_id, "status": "failed",
                         "error": {"type": reply.error[0], "message": reply.error[1]}}
        shape = openai_api.CHAT if stored.get("chat") else openai_api.COMPLETIONS
        return 200, {"id": request_id, "status": "done",
                     "completion": shape.whole(reply, reply.model or "", int(time.time()))}


def _echoed(body: Asked, message: protocol.Request, reply: protocol.Reply) -> protocol.Reply:
    """`echo`: each choice's text after its prompt (and its log-probabilities after the prompt's, when asked
    for)."""
    if not (isinstance(body, CompletionRequest) and body.echo):
        return reply
    return dataclasses.replace(reply, choices=tuple(dataclasses.replace(
        c, text=message.prompts[i // message.n] + c.text,
        logprobs=None if c.logprobs is None else (*(c.prompt_logprobs or ()), *c.logprobs))
        for i, c in enumerate(reply.choices)))


def _shape(body: Asked) -> openai_api.Shape:
    return openai_api.CHAT if isinstance(body, ChatCompletionRequest) else openai_api.COMPLETIONS


def _fresh_tokens(logged: int, part: protocol.ChunkPart) -> tuple[protocol.TokenLogprob, ...]:
    """The log-probabilities of a chunk not streamed yet (`logged` were); none when they start past those
    (a chunk went missing: the reply brings the rest)."""
    if part.token_offset > logged:
        return ()
    return part.logprobs[logged - part.token_offset:]


def _fresh(streamed: str, offset: int, text: str) -> str:
    """The part of a chunk (`text` starting at character `offset` of its choice) not streamed yet; nothing
    when it starts past what was streamed (a chunk went missing: the reply brings the rest)."""
    if offset > len(streamed):
        return ""
    return text[len(streamed) - offset:]
