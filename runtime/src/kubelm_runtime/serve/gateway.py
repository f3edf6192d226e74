"""`kubelm-runtime gateway`: an OpenAI-compatible HTTP front for the model queues.

POST /v1/completions publishes one persistent request to the model's queue and
waits for the reply on direct reply-to; GET /v1/models lists the registry;
POST /v1/requests and GET /v1/requests/{id} are the asynchronous variant, whose
results the worker stores in Redis so they outlive a gateway restart.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubelm_contract import keys, protocol, queues
from kubelm_contract.protocol import Decoding, Limits, ProtocolError

from ..broker import BrokerError, NoSuchQueue, QueueFull, RpcPool, new_request_id
from ..redis_store import OptionalRedis, RedisStore
from . import response_cache
from .settings import GatewayConfig

log = logging.getLogger(__name__)
ROUTE_TTL = 2.0
STATUS_BY_ERROR = {protocol.INVALID_REQUEST: 400, protocol.PROMPT_TOO_LONG: 400, protocol.EXPIRED: 504,
                   protocol.UNAVAILABLE: 503, protocol.INTERNAL: 500}


class CompletionRequest(BaseModel):
    """The OpenAI completions request, plus top_k and repetition_penalty."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int = 1
    stream: bool = False
    user: str | None = None
    echo: bool = False
    logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


def broker_failure(error: BrokerError, model: str) -> JSONResponse:
    if isinstance(error, NoSuchQueue):
        return openai_error(503, f"model {model!r} has no request queue yet", "unavailable_error")
    if isinstance(error, QueueFull):
        return openai_error(503, f"model {model!r} is at its queue limit; retry later", "unavailable_error")
    return openai_error(503, str(error), "unavailable_error")


def worker_defaults(entry: dict[str, Any]) -> Decoding:
    defaults = dict(entry.get("defaults") or {})
    defaults["stop"] = tuple(defaults.get("stop", ()))
    return Decoding(**defaults)


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


class Gateway:
    def __init__(self, config: GatewayConfig, rpc: RpcPool, redis_url: str | None):
        self.config = config
        self.rpc = rpc
        self.redis = OptionalRedis(redis_url, "the model registry and asynchronous results", retry_after=5)
        self.token = Path(config.auth_token_file).read_text().strip() if config.auth_token_file else None
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.registry = CollectorRegistry()
        self.requests = Counter("kubelm_gateway_requests", "HTTP requests, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("kubelm_gateway_latency_seconds", "Completion latency", ["model"],
                                 registry=self.registry)
        self._routes: dict[str, tuple[float, dict[str, Any]]] = {}

    # -- routing --------------------------------------------------------------------------------
    def models(self) -> dict[str, dict[str, Any]]:
        known: dict[str, dict[str, Any]] = {
            name: {"queue": queues.request_queue(self.config.namespace, name)} for name in self.config.models}
        registered: dict[str, Any] = self.redis.call(lambda s: s.hgetall_json(keys.MODEL_REGISTRY), {})
        prefix = keys.model_id(self.config.namespace, "")
        known.update({name[len(prefix):]: entry for name, entry in registered.items() if name.startswith(prefix)})
        return known

    def route(self, model: str) -> dict[str, Any] | None:
        """The model's registry entry; a found entry is reused for ROUTE_TTL seconds (saves a Redis
        round trip per request; a worker re-registering with new settings is seen that much later)."""
        now = time.monotonic()
        remembered = self._routes.get(model)
        if remembered is not None and now - remembered[0] < ROUTE_TTL:
            return remembered[1]
        field = keys.model_id(self.config.namespace, model)
        entry: dict[str, Any] | None = self.redis.call(lambda s: s.hget_json(keys.MODEL_REGISTRY, field), None)
        if entry is None and model in self.config.models:
            entry = {"queue": queues.request_queue(self.config.namespace, model)}
        if entry is not None:
            self._routes[model] = (now, entry)
        return entry

    def build(self, body: CompletionRequest, entry: dict[str, Any], request_id: str) -> protocol.Request:
        if body.stream:
            raise ProtocolError(protocol.INVALID_REQUEST, "stream=true is not supported; use stream=false")
        if body.n != 1 or body.echo or body.logprobs is not None:
            raise ProtocolError(protocol.INVALID_REQUEST, "n must be 1, and echo and logprobs are not supported")
        ceiling = min(self.config.max_tokens, int(entry.get("maxNewTokens", self.config.max_tokens)))
        if body.max_tokens is not None and body.max_tokens > ceiling:
            raise ProtocolError(protocol.INVALID_REQUEST,
                                f"max_tokens {body.max_tokens} is over this model's limit of {ceiling}")
        params = {k: v for k, v in {
            "max_new_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "stop": body.stop,
            "seed": body.seed}.items() if v is not None}
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        # Only what the client set travels; parsing with the worker's registered defaults gives the
        # decoding the worker will use, and refuses here what the worker would refuse.
        deadline = time.time() + self.config.request_timeout_seconds
        raw = json.dumps({"v": protocol.VERSION, "id": request_id, "prompts": prompts, "params": params,
                          "deadline": deadline, "model": body.model}).encode()
        return protocol.parse_request(raw, worker_defaults(entry), Limits(max_new_tokens=ceiling))

    def cached(self, entry: dict[str, Any], message: protocol.Request) -> tuple[protocol.Reply | None, bool]:
        """(the reply from the response cache, whether the cache was really consulted): a hit needs no trip
        through the queue, and after a real miss the worker need not look again."""
        if not entry.get("responseCache") or "digest" not in entry:
            return None, False
        material = response_cache.materials(entry["digest"], message.prompts, message.decoding)
        if not material:
            return None, False
        model = keys.model_id(self.config.namespace, str(message.model))
        choices = response_cache.lookup(self.redis, model, material)
        if choices is None:
            return None, self.redis.available
        return protocol.Reply(id=message.id, choices=choices, cached=True, model=message.model), True

    @staticmethod
    def completion(reply: protocol.Reply, model: str, created: int) -> dict[str, Any]:
        prompt_tokens = sum(c.prompt_tokens for c in reply.choices)
        completion_tokens = sum(c.completion_tokens for c in reply.choices)
        return {
            "id": f"cmpl-{reply.id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(reply.choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": None,
            # Extra fields are ignored by OpenAI clients; they say how the answer was produced.
            "kubelm": {"cached": reply.cached, "timings": reply.timings},
        }


class Guard:
    """Bearer token and body size checks and per-route counts for /v1/, as plain ASGI middleware (the
    decorator form wraps every request in an extra task and stream, which costs a cache hit ~0.2 ms)."""

    def __init__(self, app: Any, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        gateway, config = self.gateway, self.gateway.config
        route = path if not path.startswith("/v1/requests/") else "/v1/requests/{id}"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if gateway.token is not None and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {gateway.token}".encode()):
            refusal = openai_error(401, "missing or wrong bearer token", "authentication_error", "invalid_api_key")
        length = headers.get("content-length", "")
        if refusal is None and length.isdigit() and int(length) > config.max_body_bytes:
            refusal = openai_error(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
        if refusal is not None:
            gateway.requests.labels(route, str(refusal.status_code)).inc()
            await refusal(scope, receive, send)
            return
        status = 500

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            gateway.requests.labels(route, str(status)).inc()


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="kubelm gateway", docs_url=None, redoc_url=None)
    config = gateway.config

    app.add_middleware(Guard, gateway=gateway)

    async def parse(request: Request) -> CompletionRequest | JSONResponse:
        # Counted as it arrives: a chunked body has no Content-Length for the guard to check first.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                return openai_error(413, f"request body over {config.max_body_bytes} bytes", "invalid_request_error")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return CompletionRequest.model_validate_json(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            return openai_error(400, problems, "invalid_request_error")

    async def prepare(request: Request) -> tuple[CompletionRequest, dict[str, Any], protocol.Request] | JSONResponse:
        body = await parse(request)
        if isinstance(body, JSONResponse):
            return body
        entry = gateway.route(body.model)
        if entry is None:
            return openai_error(404, f"model {body.model!r} does not exist", "invalid_request_error",
                                "model_not_found")
        try:
            return body, entry, gateway.build(body, entry, new_request_id())
        except ProtocolError as e:
            return openai_error(400, str(e), "invalid_request_error", e.kind)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse:
        prepared = await prepare(request)
        if isinstance(prepared, JSONResponse):
            return prepared
        body, entry, message = prepared
        hit, cache_checked = gateway.cached(entry, message)
        if hit is not None:
            return JSONResponse(gateway.completion(hit, body.model, int(time.time())))
        if gateway.slots.locked():
            return openai_error(429, "too many requests in flight at this gateway; retry later", "rate_limit_error")
        started = time.perf_counter()
        async with gateway.slots:
            try:
                headers = {queues.SENT_AT_HEADER: int(time.time() * 1000),
                           queues.CACHE_CHECKED_HEADER: int(cache_checked)}
                raw = await gateway.rpc.call(entry["queue"], message.to_json(), message.id,
                                             config.request_timeout_seconds, headers)
            except TimeoutError:
                return openai_error(504, f"no reply within {config.request_timeout_seconds:g}s; the request "
                                         "expires in the queue", "timeout_error")
            except BrokerError as e:
                return broker_failure(e, body.model)
        reply = protocol.Reply.from_json(raw)
        gateway.latency.labels(body.model).observe(time.perf_counter() - started)
        if reply.error:
            kind, text = reply.error
            return openai_error(STATUS_BY_ERROR.get(kind, 500), text, "invalid_request_error"
                                if kind in (protocol.INVALID_REQUEST, protocol.PROMPT_TOO_LONG) else "server_error",
                                kind)
        return JSONResponse(gateway.completion(reply, body.model, int(time.time())))

    @app.post("/v1/requests", response_model=None)
    async def submit(request: Request) -> JSONResponse:
        prepared = await prepare(request)
        if isinstance(prepared, JSONResponse):
            return prepared
        body, entry, message = prepared
        result_key = keys.result(message.id)
        ttl = config.result_ttl_seconds
        def mark_pending(store: RedisStore) -> bool:
            store.set_json(result_key, {"status": "pending", "model": body.model}, ttl)
            return True

        stored = gateway.redis.call(mark_pending, False, force=True)
        if not stored:
            return openai_error(503, "asynchronous requests need Redis, which is unavailable", "unavailable_error")
        try:
            await gateway.rpc.send(entry["queue"], message.to_json(), message.id, ttl, {
                queues.RESULT_KEY_HEADER: result_key, queues.RESULT_TTL_HEADER: ttl,
                queues.SENT_AT_HEADER: int(time.time() * 1000)})
        except BrokerError as e:
            return broker_failure(e, body.model)
        return JSONResponse({"id": message.id, "status": "pending", "model": body.model}, status_code=202)

    @app.get("/v1/requests/{request_id}", response_model=None)
    async def result(request_id: str) -> JSONResponse:
        stored = gateway.redis.call(lambda s: s.get_json(keys.result(request_id)), None, force=True)
        if stored is None:
            return openai_error(404, f"no request {request_id!r} (unknown, or its result expired)",
                                "invalid_request_error")
        if stored.get("status") != "done":
            return JSONResponse({"id": request_id, "status": "pending"}, status_code=202)
        reply = protocol.Reply.from_json(json.dumps(stored["reply"]))
        if reply.error:
            return JSONResponse({"id": request_id, "status": "failed",
                                 "error": {"type": reply.error[0], "message": reply.error[1]}})
        return JSONResponse({"id": request_id, "status": "done",
                             "completion": gateway.completion(reply, reply.model or "", int(time.time()))})

    @app.get("/v1/models", response_model=None)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "kubelm"} for name in sorted(gateway.models())]})

    @app.get("/healthz", response_model=None)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_model=None)
    async def readyz() -> PlainTextResponse:
        ready = gateway.rpc.connected
        return PlainTextResponse("ready\n" if ready else "not connected to RabbitMQ\n", 200 if ready else 503)

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run(config: GatewayConfig, amqp_url: str, redis_url: str | None) -> None:
    import uvicorn

    rpc = RpcPool(amqp_url, config.publish_connections, name=f"kubelm-gateway {config.namespace}")
    rpc.start()
    app = create_app(Gateway(config, rpc, redis_url))
    try:
        # Keep idle client connections longer than the usual 60 s of load balancers in front, which
        # would otherwise reuse a connection the gateway just closed (a 502 for the client).
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                    timeout_keep_alive=75)
    finally:
        rpc.close()
