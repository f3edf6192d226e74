"""`kubelm-runtime gateway`: an OpenAI-compatible HTTP front for the model queues.

POST /v1/completions (and /v1/chat/completions, whose messages the worker renders
with the model's chat template) publishes one persistent request to the model's queue and
waits for the reply on direct reply-to; GET /v1/models lists the registry;
POST /v1/requests and GET /v1/requests/{id} are the asynchronous variant, whose
results the worker stores in Redis so they outlive a gateway restart.

This module is HTTP only: the API key and body-size guard, thin routes, and the
process. What a request means lives in `completions` (the serving layer) and
`openai_api` (the API's shapes).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubelm_contract import env
from kubelm_contract.settings import SettingsError

from ..broker import RpcPool
from . import openai_api
from .completions import CompletionService, GatewayMetrics, RedisGatewayStore
from .openai_api import ApiError, ChatCompletionRequest, CompletionRequest
from .settings import GatewayConfig

log = logging.getLogger(__name__)
access_log = logging.getLogger("kubelm_runtime.serve.access")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/requests", "/v1/models")
"""The API's paths, as the per-route metric names them; any other path counts as "other" (a label per
path a client makes up would grow the metric without bound)."""
DISCARD_LIMIT = 64 * 1024 * 1024
"""The most of a refused body read and dropped so that its client can read the refusal."""


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def discard_body(receive: Any, declared: int) -> None:
    """Reads and drops a refused request's body. A client that writes its whole body before reading
    (urllib, for one) would otherwise have its connection reset under it by a close with unread data,
    and never see the refusal. Bodies over DISCARD_LIMIT are not read: those clients may see a reset."""
    if declared > DISCARD_LIMIT:
        return
    read = 0
    while read <= DISCARD_LIMIT:  # a chunked body declares no length: count what comes
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        read += len(message.get("body", b""))


class Guard:
    """API key and body size checks, per-route counts and the access log for /v1/, as plain ASGI
    middleware (the decorator form wraps every request in an extra task and stream, which costs a cache
    hit ~0.2 ms)."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int, metrics: GatewayMetrics,
                 log_access: bool = True):
        self.app, self.token, self.max_body_bytes, self.metrics = app, token, max_body_bytes, metrics
        self.log_access = log_access

    def _authenticated(self, headers: dict[str, str]) -> bool:
        """The key as OpenAI's clients send it, or in Azure OpenAI's `api-key` header: the one form that
        passes the Kubernetes API server's service proxy, which keeps the Authorization header for itself."""
        assert self.token is not None
        token = self.token.encode()
        # Header values arrive as bytes, kept here as latin-1 text: latin-1 gives those bytes back.
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        key = headers.get("api-key", "")
        return any(given != "" and hmac.compare_digest(given.strip().encode("latin-1"), token)
                   for given in (credentials if scheme.lower() == "bearer" else "", key))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = "/v1/requests/{id}" if path.startswith("/v1/requests/") else path if path in ROUTES else "other"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if self.token is not None and not self._authenticated(headers):
            refusal = ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY' or in an "
                               "'api-key' header", "authentication_error", "invalid_api_key")
        length = headers.get("content-length", "")
        declared = int(length) if length.isdigit() else 0
        if refusal is None and declared > self.max_body_bytes:
            refusal = openai_api.too_large(self.max_body_bytes)
        status = 500

        async def counted_send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if refusal is None:
                await self.app(scope, receive, counted_send)
            else:
                # A client that asked to continue sends nothing until it hears from us.
                if headers.get("expect", "").lower() != "100-continue":
                    await discard_body(receive, declared)
                await error_response(refusal)(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            if self.log_access:
                client = scope.get("client") or ("-", 0)
                access_log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1], scope["method"], path, status,
                                (time.perf_counter() - started) * 1000)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it arrives: a chunked body has no Content-Length for the guard to check."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise openai_api.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def server_sent_events(first: dict[str, Any] | None,
                             events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """OpenAI's stream framing: `data: {json}` per event, an error as an event of its own once the
    stream has begun, then `data: [DONE]`. Closed early (the client went away while an event was being
    sent), it closes the events at once, which cancels the request at the workers."""
    async with contextlib.aclosing(events):
        try:
            if first is not None:
                yield openai_api.server_sent_event(first)
            async for event in events:
                yield openai_api.server_sent_event(event)
        except ApiError as e:
            yield openai_api.server_sent_event(e.body())
        yield openai_api.server_sent_event("[DONE]")


async def disconnected(request: Request) -> None:
    """Returns once the client has gone. Called after the body was read, so the next message the server
    has for this request is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: CompletionService, rpc_connected: Callable[[], bool], token: str | None = None) -> FastAPI:
    app = FastAPI(title="kubelm gateway", docs_url=None, redoc_url=None)
    config = service.config
    app.add_middleware(Guard, token=token, max_body_bytes=config.max_body_bytes, metrics=service.metrics,
                       log_access=config.access_log)

    @app.exception_handler(ApiError)
    async def refused(_request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def unrouted(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """No such path or method: in OpenAI's error shape too, as its API answers, not FastAPI's."""
        where = f"{request.method} {request.url.path}"
        message = f"Invalid URL ({where})" if error.status_code == 404 else f"{error.detail} ({where})"
        response = error_response(ApiError(error.status_code, message, "invalid_request_error"))
        response.headers.update(error.headers or {})  # a 405's Allow
        return response

    async def parsed(request: Request) -> CompletionRequest:
        return openai_api.parse_completion_request(await read_body(request, config.max_body_bytes))

    async def answer(request: Request, body: CompletionRequest | ChatCompletionRequest) -> Response:
        if not body.stream:
            return JSONResponse(await service.complete(body, lambda: disconnected(request)))
        events = service.stream(body)
        first = await anext(events, None)  # a refusal before any text is still an HTTP error
        return StreamingResponse(server_sent_events(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await answer(request, await parsed(request))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, config.max_body_bytes)
        return await answer(request, openai_api.parse_chat_request(raw))

    @app.post("/v1/requests", response_model=None)
    async def submit(request: Request) -> JSONResponse:
        raw = await read_body(request, config.max_body_bytes)
        return JSONResponse(await service.submit(openai_api.parse_any_request(raw)), status_code=202)

    @app.get("/v1/requests/{request_id}", response_model=None)
    async def result(request_id: str) -> JSONResponse:
        status, body = await service.result(request_id)
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models", response_model=None)
    async def list_models() -> JSONResponse:
        return JSONResponse(openai_api.model_list(list(await service.models())))

    @app.get("/healthz", response_model=None)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_model=None)
    async def readyz() -> PlainTextResponse:
        ready = rpc_connected()
        return PlainTextResponse("ready\n" if ready else "not connected to RabbitMQ\n", 200 if ready else 503)

    @app.get("/metrics", response_model=None)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run(config: GatewayConfig, amqp_url: str, redis_url: str | None) -> None:
    import uvicorn

    token = Path(config.auth_token_file).read_text().strip() if config.auth_token_file else None
    if token == "":
        raise SettingsError(f"authTokenFile {config.auth_token_file} is empty: put the API key clients must send "
                            "in it, or unset authTokenFile")
    rpc = RpcPool(amqp_url, config.publish_connections, name=f"kubelm-gateway {config.namespace}")
    rpc.start()
    store = RedisGatewayStore(redis_url, os.environ.get(env.MEMCACHED_URL))
    app = create_app(CompletionService(config, rpc, store), lambda: rpc.connected, token)
    log.info("gateway for namespace %s listening on http://%s:%d (%d publish connections, Redis %s, API "
             "key %s, access log %s)", config.namespace, config.host, config.port, config.publish_connections,
             "configured" if redis_url else "not configured", "required" if token else "not required",
             "on" if config.access_log else "off")
    try:
        # Keep idle client connections longer than the usual 60 s of load balancers in front, which
        # would otherwise reuse a connection the gateway just closed (a 502 for the client).
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                    timeout_keep_alive=75)
    finally:
        rpc.close()
