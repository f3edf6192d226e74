"""The OpenAI API as the gateway speaks it: the request model, response bodies and the error shape.

Pure: no HTTP framework, broker or Redis, so every shape is testable on its own.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubelm_contract import protocol

# How the worker's error kinds reach HTTP clients.
STATUS_BY_ERROR = {protocol.INVALID_REQUEST: 400, protocol.PROMPT_TOO_LONG: 400, protocol.EXPIRED: 504,
                   protocol.UNAVAILABLE: 503, protocol.INTERNAL: 500}


class ApiError(Exception):
    """A refusal in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


def invalid(message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over {limit} bytes", "invalid_request_error")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "unavailable_error")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampled(BaseModel):
    """What both APIs' requests share: the model, decoding parameters (OpenAI's plus top_k and
    repetition_penalty), n and streaming. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class CompletionRequest(_Sampled):
    """The OpenAI completions request."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=protocol.MAX_TOP_LOGPROBS)


    @property
    def new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs(self) -> int | None:
        return self.logprobs

    def conversation(self) -> list[tuple[str, str]] | None:
        return None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    """Accepted as OpenAI's API does; a chat template sees only role and content."""

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampled):
    """The OpenAI chat completions request (text messages)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens; it wins when both are given."""
    logprobs: bool | None = None
    top_logprobs_asked: int | None = Field(default=None, ge=0, le=protocol.MAX_TOP_LOGPROBS, alias="top_logprobs")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs_asked is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs(self) -> int | None:
        """Alternatives per token, or None when no log-probabilities were asked for."""
        return (self.top_logprobs_asked or 0) if self.logprobs else None

    def conversation(self) -> list[tuple[str, str]] | None:
        return [(m.role, m.text()) for m in self.messages]


Parsed = TypeVar("Parsed", CompletionRequest, ChatCompletionRequest)


def _parse(model: type[Parsed], raw: bytes) -> Parsed:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid(_problems(e)) from e


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in error.errors())


def parse_completion_request(raw: bytes) -> CompletionRequest:
    return _parse(CompletionRequest, raw)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, raw)


def parse_any_request(raw: bytes) -> CompletionRequest | ChatCompletionRequest:
    """A body of either API, told apart by its `messages` (a chat) or not (a completion)."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise invalid(f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise invalid("body must be a JSON object")
    model: type[CompletionRequest] | type[ChatCompletionRequest] = (
        ChatCompletionRequest if "messages" in data else CompletionRequest)
    try:
        # From the raw text, as the synchronous routes validate: the JSON parser refuses what no UTF-8
        # text holds (a lone surrogate escape), which `json.loads` lets through.
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid(_problems(e)) from e


def reply_error(kind: str, message: str) -> ApiError:
    """The worker's refusal of a request, as the HTTP client sees it."""
    client_side = kind in (protocol.INVALID_REQUEST, protocol.PROMPT_TOO_LONG)
    return ApiError(STATUS_BY_ERROR.get(kind, 500), message, "invalid_request_error" if client_side else "server_error",
                    kind)


def completion_logprobs(tokens: tuple[protocol.TokenLogprob, ...] | None,
                        before: tuple[protocol.TokenLogprob, ...] = ()) -> dict[str, Any] | None:
    """The completions API's form: parallel lists, each token's offset counted in characters of the text
    (after the tokens `before` these, streamed earlier): the characters wholly before its first byte, so
    the tokens that share a character start at it."""
    if tokens is None:
        return None
    # An incremental decoder holds a character's first bytes back until its last one comes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    at = sum(len(decoder.decode(bytes(t.raw()))) for t in before)
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(decoder.decode(bytes(t.raw())))
    # A prompt's first token (echo) has no log-probability and no alternatives: null in both lists.
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens], "text_offset": offsets}


def _with_bytes(token: str, logprob: float | None, raw: tuple[int, ...]) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokens: tuple[protocol.TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """The chat API's form: one entry per token with its bytes, its alternatives inside."""
    if tokens is None:
        return None
    return {"content": [{**_with_bytes(t.token, t.logprob, t.raw()),
                         "top_logprobs": [_with_bytes(text, lp, raw)
                                          for (text, lp), raw in zip(t.top, t.top_raw(), strict=True)]}
                        for t in tokens], "refusal": None}


def completion(reply: protocol.Reply, model: str, created: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-{reply.id}", "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": c.text, "index": i, "logprobs": completion_logprobs(c.logprobs),
                     "finish_reason": c.finish_reason} for i, c in enumerate(reply.choices)],
        "usage": _usage(reply), "system_fingerprint": None,
        # Extra fields are ignored by OpenAI clients; they say how the answer was produced.
        "kubelm": {"cached": reply.cached, "timings": reply.timings},
    }


def completion_chunk(request_id: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None, first: bool = False,
                     logprobs: tuple[protocol.TokenLogprob, ...] | None = None,
                     before: tuple[protocol.TokenLogprob, ...] = ()) -> dict[str, Any]:
    """One streamed event: new text of one choice (with its tokens' log-probabilities when asked for, the
    offsets counted after the tokens streamed `before`), and its finish reason on the last."""
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": completion_logprobs(logprobs, before),
                         "finish_reason": finish_reason}],
            "system_fingerprint": None}


def usage_chunk(reply: protocol.Reply, model: str, created: int) -> dict[str, Any]:
    """The last event before [DONE] when the client asked for `stream_options.include_usage`."""
    return {"id": f"cmpl-{reply.id}", "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": _usage(reply)}


def _usage(reply: protocol.Reply) -> dict[str, int]:
    prompt_tokens, completion_tokens = reply.prompt_tokens, reply.completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(reply: protocol.Reply, model: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{reply.id}", "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
                    for i, c in enumerate(reply.choices)],
        "usage": _usage(reply), "system_fingerprint": None,
        "kubelm": {"cached": reply.cached, "timings": reply.timings},
    }


def chat_chunk(request_id: str, model: str, created: int, index: int, text: str,
               finish_reason: str | None = None, first: bool = False,
               logprobs: tuple[protocol.TokenLogprob, ...] | None = None,
               before: tuple[protocol.TokenLogprob, ...] = ()) -> dict[str, Any]:
    """A choice's first event says the role; the last carries the finish reason."""
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs),
                         "finish_reason": finish_reason}],
            "system_fingerprint": None}


def chat_usage_chunk(reply: protocol.Reply, model: str, created: int) -> dict[str, Any]:
    return {"id": f"chatcmpl-{reply.id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": _usage(reply)}


@dataclass(frozen=True)
class Shape:
    """How one API answers: the whole response, a stream event, and the stream's usage event."""

    whole: Callable[[protocol.Reply, str, int], dict[str, Any]]
    chunk: Callable[..., dict[str, Any]]
    usage: Callable[[protocol.Reply, str, int], dict[str, Any]]


COMPLETIONS = Shape(completion, completion_chunk, usage_chunk)
CHAT = Shape(chat_completion, chat_chunk, chat_usage_chunk)


def server_sent_event(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))).encode() + b"\n\n"


def model_list(names: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kubelm"}
                                       for name in sorted(names)]}
