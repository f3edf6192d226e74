"""The request-queue wire protocol, version 1 (docs/protocol.md).

A request is a JSON object published to a model's queue; the reply goes to the
request's `reply_to` with the same `correlation_id`. Everything a client sends is
validated here, at the edge, into plain dataclasses; a message that does not fit
raises ProtocolError with a type a client can act on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

VERSION = 1
CONTENT_TYPE = "application/json"
MAX_PROMPTS = 64
"""Also the most rows one request may ask for: prompts times `n`."""
MAX_N = 16
MAX_PROMPT_CHARS = 1_000_000
MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "developer", "user", "assistant")

# Error types, stable for clients.
INVALID_REQUEST = "invalid_request"
PROMPT_TOO_LONG = "prompt_too_long"
EXPIRED = "expired"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
ERROR_KINDS = (INVALID_REQUEST, PROMPT_TOO_LONG, EXPIRED, INTERNAL, UNAVAILABLE)

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ProtocolError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int = 1024
    max_new_tokens: int = 512


@dataclass(frozen=True)
class Decoding:
    """Decoding parameters of one request; defaults come from the LanguageModel spec."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    """Return each generated token's log-probability and this many most likely alternatives (0-20);
    None: no log-probabilities."""
    prompt_logprobs: bool = False
    """Also the prompt's tokens with theirs (the completions API's `echo` with `logprobs`): one more
    forward pass over the prompt. Needs `logprobs`."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    """OpenAI's penalties (-2 to 2): subtracted from the logit of every token the row generated so far,
    once (presence) and once per time it came (frequency)."""

    @property
    def deterministic(self) -> bool:
        """Greedy or seeded: the same request always gets the same text (and may be cached)."""
        return self.temperature == 0 or self.seed is not None


@dataclass(frozen=True)
class Request:
    id: str
    prompts: tuple[str, ...]
    decoding: Decoding
    deadline: float | None = None
    """Unix time after which the answer is useless (also the message expiration)."""
    model: str | None = None
    n: int = 1
    """Completions per prompt: rows sharing one prefill; choices are ordered prompt by prompt."""
    stream: bool = False
    """Send text as it is generated (chunk messages, then the reply)."""
    messages: tuple[tuple[str, str], ...] = ()
    """A chat request's conversation, (role, content) in order, instead of prompts: the worker renders it
    into its one prompt with the model's chat template (docs/protocol.md)."""

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) > self.deadline

    def to_json(self) -> bytes:
        params = {**asdict(self.decoding), "stop": list(self.decoding.stop)}
        # Left out at their defaults: a worker older than these parameters still takes the request.
        for optional, default in OPTIONAL_PARAMS:
            if params[optional] == default:
                del params[optional]
        body: dict[str, Any] = {"v": VERSION, "id": self.id, "params": params}
        if self.messages:
            body["messages"] = [{"role": role, "content": content} for role, content in self.messages]
        else:
            body["prompts"] = list(self.prompts)
        if self.deadline is not None:
            body["deadline"] = self.deadline
        if self.model is not None:
            body["model"] = self.model
        if self.n != 1:
            body["n"] = self.n
        if self.stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":")).encode()

    def samples(self) -> list[tuple[str, Decoding]]:
        """(prompt, decoding) of each row in choice order: `n` per prompt. A seeded request's samples
        take seed, seed + 1, …, so they differ from each other and stay reproducible."""
        rows = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = self.decoding.seed
                rows.append((prompt, self.decoding if seed is None or j == 0
                             else replace(self.decoding, seed=(seed + j) % 2**63)))
        return rows


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability under the model (before temperature, top-k/p), and
    the most likely tokens at that position with theirs."""

    token: str
    logprob: float | None
    """None only for a prompt's first token, which nothing before it predicts."""
    top: tuple[tuple[str, float], ...] = ()
    token_bytes: tuple[int, ...] | None = None
    """The token's raw bytes, when the worker knows them: a token holding part of a character shows
    U+FFFD as its text. None (a worker from before the field): the text's UTF-8."""
    top_bytes: tuple[tuple[int, ...], ...] | None = None
    """The same for each of `top`."""

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"token": self.token, "logprob": self.logprob, "top": [list(t) for t in self.top]}
        if self.token_bytes is not None:
            found["bytes"] = list(self.token_bytes)
        if self.top_bytes is not None:
            found["top_bytes"] = [list(b) for b in self.top_bytes]
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLogprob:
        logprob = data["logprob"]
        raw, top_raw = data.get("bytes"), data.get("top_bytes")
        return cls(str(data["token"]), None if logprob is None else float(logprob),
                   tuple((str(t), float(lp)) for t, lp in data.get("top", ())),
                   None if raw is None else tuple(int(b) for b in raw),
                   None if top_raw is None else tuple(tuple(int(b) for b in t) for t in top_raw))

    def raw(self) -> tuple[int, ...]:
        return self.token_bytes if self.token_bytes is not None else tuple(self.token.encode())

    def top_raw(self) -> list[tuple[int, ...]]:
        if self.top_bytes is not None and len(self.top_bytes) == len(self.top):
            return list(self.top_bytes)
        return [tuple(text.encode()) for text, _ in self.top]


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    """Per generated token of `text`, when the request asked for them."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """Per token of the prompt, when the request asked for them (`Decoding.prompt_logprobs`)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text": self.text, "finish_reason": self.finish_reason,
                                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.logprobs is not None:
            data["logprobs"] = [t.to_dict() for t in self.logprobs]
        if self.prompt_logprobs is not None:
            data["prompt_logprobs"] = [t.to_dict() for t in self.prompt_logprobs]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Choice:
        """A choice as `to_dict` wrote it; anything else (a stored entry that is not one) is a ValueError."""
        if not isinstance(data, dict) or not _CHOICE_KEYS[0] <= set(data) <= _CHOICE_KEYS[1]:
            raise ValueError(f"not a choice: {data!r:.200}")
        try:
            logprobs, prompt_logprobs = data.get("logprobs"), data.get("prompt_logprobs")
            return cls(str(data["text"]), str(data["finish_reason"]), int(data["prompt_tokens"]),
                       int(data["completion_tokens"]),
                       None if logprobs is None else tuple(TokenLogprob.from_dict(t) for t in logprobs),
                       None if prompt_logprobs is None else tuple(TokenLogprob.from_dict(t) for t in prompt_logprobs))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a choice: {data!r:.200}") from e


_CHOICE_KEYS = ({"text", "finish_reason", "prompt_tokens", "completion_tokens"},
                {"text", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs", "prompt_logprobs"})


@dataclass(frozen=True)
class Reply:
    id: str
    choices: tuple[Choice, ...] = ()
    error: tuple[str, str] | None = None
    """(type, message) when the request failed."""
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    model: str | None = None
    n: int = 1
    """Choices per prompt (the request's `n`): a prompt's tokens count once in the usage."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.choices[::self.n])

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"v": VERSION, "id": self.id, "ok": self.ok}
        if self.error:
            body["error"] = {"type": self.error[0], "message": self.error[1]}
        else:
            body["choices"] = [c.to_dict() for c in self.choices]
            body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
            body["cached"] = self.cached
        if self.timings:
            body["timings"] = self.timings
        if self.model:
            body["model"] = self.model
        if self.n != 1:
            body["n"] = self.n
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Reply:
        data = json.loads(raw)
        error = data.get("error")
        return cls(
            id=str(data.get("id", "")),
            choices=tuple(Choice.from_dict(c) for c in data.get("choices", [])),
            error=(str(error["type"]), str(error["message"])) if error else None,
            timings=dict(data.get("timings", {})),
            cached=bool(data.get("cached", False)),
            model=data.get("model"),
            n=int(data.get("n", 1)),
        )


def result_document(reply: Reply, chat: bool = False) -> dict[str, Any]:
    """What a worker stores under an asynchronous request's result key (the gateway stores
    `{"status": "pending"}` there first): the reply, and whether the request was a chat."""
    document: dict[str, Any] = {"status": "done", "reply": json.loads(reply.to_json())}
    if chat:
        document["chat"] = True
    return document


def error_reply(request_id: str, kind: str, message: str) -> Reply:
    return Reply(id=request_id, error=(kind, message))


def _number(params: dict[str, Any], key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(INVALID_REQUEST, f"params.{key} must be a number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ProtocolError(INVALID_REQUEST, f"params.{key} must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _integer(params: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(INVALID_REQUEST, f"params.{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ProtocolError(INVALID_REQUEST, f"params.{key} must be in [{low}, {high}], got {value}")
    return value


PARAMS = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "logprobs",
          "prompt_logprobs", "presence_penalty", "frequency_penalty"}
OPTIONAL_PARAMS = (("logprobs", None), ("prompt_logprobs", False), ("presence_penalty", 0.0),
                   ("frequency_penalty", 0.0))
"""Parameters that travel, and key cache entries, only when set: at their defaults a request and its
cache key are those of before they existed (an older worker still takes it; cached entries still hit)."""


def parse_decoding(params: Any, defaults: Decoding, limits: Limits) -> Decoding:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_REQUEST, "params must be an object")
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise ProtocolError(INVALID_REQUEST, f"unknown parameter(s): {', '.join(unknown)}; known: "
                                             f"{', '.join(sorted(PARAMS))}")
    stop = params.get("stop", list(defaults.stop))
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop)):
        raise ProtocolError(INVALID_REQUEST, f"params.stop must be up to {MAX_STOP_SEQUENCES} non-empty strings "
                                             "of at most 64 characters")
    max_new = _integer(params, "max_new_tokens", defaults.max_new_tokens, 1, limits.max_new_tokens)
    assert max_new is not None
    prompt_logprobs = params.get("prompt_logprobs", False)
    if not isinstance(prompt_logprobs, bool):
        raise ProtocolError(INVALID_REQUEST, "params.prompt_logprobs must be true or false")
    if prompt_logprobs and params.get("logprobs") is None:
        raise ProtocolError(INVALID_REQUEST, "params.prompt_logprobs needs params.logprobs")
    return Decoding(
        max_new_tokens=max_new,
        temperature=_number(params, "temperature", defaults.temperature, 0.0, 10.0),
        top_p=_number(params, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=int(_integer(params, "top_k", defaults.top_k, 0, 100_000) or 0),
        repetition_penalty=_number(params, "repetition_penalty", defaults.repetition_penalty, 0.0, 10.0,
                                   low_open=True),
        stop=tuple(stop),
        seed=_integer(params, "seed", defaults.seed, 0, 2**63 - 1),
        # Asked per request only: a model's defaults never turn log-probabilities on.
        logprobs=_integer(params, "logprobs", None, 0, MAX_TOP_LOGPROBS),
        prompt_logprobs=prompt_logprobs,
        presence_penalty=_number(params, "presence_penalty", defaults.presence_penalty, -2.0, 2.0),
        frequency_penalty=_number(params, "frequency_penalty", defaults.frequency_penalty, -2.0, 2.0),
    )


def parse_request(raw: bytes, defaults: Decoding, limits: Limits) -> Request:
    """Validates a request body; raises ProtocolError naming what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(INVALID_REQUEST, f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ProtocolError(INVALID_REQUEST, "body must be a JSON object")
    try:  # JSON may escape a lone surrogate, which no tokenizer, cache key or reply can encode
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ProtocolError(INVALID_REQUEST, "text must be valid Unicode (a lone surrogate escape such as \\ud800 "
                                             "is not)") from e
    unknown = sorted(set(data) - {"v", "id", "prompts", "prompt", "messages", "params", "deadline", "model", "n",
                                  "stream"})
    if unknown:
        raise ProtocolError(INVALID_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    if data.get("v", VERSION) != VERSION:
        raise ProtocolError(INVALID_REQUEST, f"protocol version {data.get('v')!r} not supported (this is {VERSION})")
    request_id = data.get("id")
    if not isinstance(request_id, str) or not _ID.match(request_id):
        raise ProtocolError(INVALID_REQUEST, "id must be 1-128 characters of letters, digits and ._:-")
    if sum(k in data for k in ("prompt", "prompts", "messages")) > 1:
        raise ProtocolError(INVALID_REQUEST, "give one of prompt, prompts or messages")
    messages = _messages(data["messages"]) if "messages" in data else ()
    given = [] if messages else data.get("prompts", [data["prompt"]] if "prompt" in data else None)
    if not messages and (not isinstance(given, list) or not given or len(given) > MAX_PROMPTS
                         or not all(isinstance(p, str) for p in given)):
        raise ProtocolError(INVALID_REQUEST, f"prompts must be a list of 1 to {MAX_PROMPTS} strings")
    prompts: list[str] = given  # type: ignore[assignment]
    if any(len(p) > MAX_PROMPT_CHARS for p in prompts) or sum(len(c) for _, c in messages) > MAX_PROMPT_CHARS:
        raise ProtocolError(PROMPT_TOO_LONG, f"a prompt is longer than {MAX_PROMPT_CHARS} characters")
    deadline = data.get("deadline")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int | float)):
        raise ProtocolError(INVALID_REQUEST, "deadline must be a Unix time in seconds")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(INVALID_REQUEST, "model must be a string")
    n = data.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ProtocolError(INVALID_REQUEST, f"n must be an integer from 1 to {MAX_N}")
    if max(len(prompts), 1) * n > MAX_PROMPTS:
        raise ProtocolError(INVALID_REQUEST, f"prompts times n is {len(prompts) * n}; at most {MAX_PROMPTS} "
                                             "completions per request")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ProtocolError(INVALID_REQUEST, "stream must be true or false")
    return Request(request_id, tuple(prompts), parse_decoding(data.get("params"), defaults, limits),
                   float(deadline) if deadline is not None else None, model, n, stream, messages)


def _messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MESSAGES:
        raise ProtocolError(INVALID_REQUEST, f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ProtocolError(INVALID_REQUEST, f"messages[{i}] must have exactly role and content")
        if message["role"] not in CHAT_ROLES:
            raise ProtocolError(INVALID_REQUEST, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise ProtocolError(INVALID_REQUEST, f"messages[{i}].content must be a string")
        out.append((message["role"], message["content"]))
    return tuple(out)


def with_prompt(request: Request, prompt: str) -> Request:
    """A chat request once its conversation is rendered: one prompt, the conversation kept."""
    return replace(request, prompts=(prompt,))


def cache_key_material(model_digest: str, prompt: str, decoding: Decoding) -> str:
    """What identifies a deterministic completion: model content, normalised prompt, decoding parameters."""
    normalised = prompt.replace("\r\n", "\n")
    # Requests with log-probabilities are never cached, so they do not key entries either (and keys stay
    # those of before the field existed).
    keyed = {k: v for k, v in asdict(decoding).items()
             if k not in ("logprobs", "prompt_logprobs") and (k, v) not in OPTIONAL_PARAMS}
    params = json.dumps({**keyed, "stop": list(decoding.stop)}, sort_keys=True)
    return hashlib.sha256(f"{model_digest}\0{normalised}\0{params}".encode()).hexdigest()



CHUNK_TYPE = "chunk"
"""The AMQP `type` property of a chunk message; the reply that ends a streamed request has none."""
CHUNKS_TYPE = "chunks"
"""The AMQP `type` of a message carrying the chunks of several streamed requests that share a reply address
(one gateway connection's): one publish per address and step instead of one per request."""


@dataclass(frozen=True)
class ChunkPart:
    """What one choice generated since its last chunk."""

    offset: int
    """Characters of the choice's text sent before `text`."""
    text: str
    token_offset: int = 0
    """Tokens with log-probabilities sent before `logprobs`."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Of the tokens whose text is now wholly sent, when the request asked for log-probabilities."""
    finish_reason: str | None = None
    """Set on a choice's last chunk, sent when that choice ends while others of the request go on (the
    reply ends the rest)."""


def chunk_message(request_id: str, parts: dict[int, ChunkPart]) -> bytes:
    """A chunk message: the new parts of the choices that have any, by choice index."""
    return json.dumps({"v": VERSION, "id": request_id, "chunks": _chunks_json(parts)},
                      separators=(",", ":")).encode()


def chunks_message(parts: dict[str, dict[int, ChunkPart]]) -> bytes:
    """A grouped chunk message: the parts of several requests, by correlation id."""
    return json.dumps({"v": VERSION, "requests": [{"id": correlation_id, "chunks": _chunks_json(found)}
                                                  for correlation_id, found in parts.items()]},
                      separators=(",", ":")).encode()


def _chunks_json(parts: dict[int, ChunkPart]) -> list[dict[str, Any]]:
    chunks = []
    for index, part in sorted(parts.items()):
        chunk: dict[str, Any] = {"index": index, "offset": part.offset, "text": part.text}
        if part.logprobs:
            chunk["token_offset"] = part.token_offset
            chunk["logprobs"] = [t.to_dict() for t in part.logprobs]
        if part.finish_reason is not None:
            chunk["finish_reason"] = part.finish_reason
        chunks.append(chunk)
    return chunks


def _parts(chunks: Any) -> dict[int, ChunkPart]:
    return {int(c["index"]): ChunkPart(int(c["offset"]), str(c["text"]), int(c.get("token_offset", 0)),
                                       tuple(TokenLogprob.from_dict(t) for t in c.get("logprobs", ())),
                                       None if c.get("finish_reason") is None else str(c["finish_reason"]))
            for c in chunks}


def parse_chunk_message(raw: bytes) -> dict[int, ChunkPart]:
    """The parts by choice index; empty for a body that is not a chunk message."""
    try:
        return _parts(json.loads(raw)["chunks"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def parse_chunks_message(raw: bytes) -> dict[str, dict[int, ChunkPart]]:
    """A grouped chunk message's parts by correlation id; empty for a body that is not one."""
    try:
        return {str(r["id"]): _parts(r["chunks"]) for r in json.loads(raw)["requests"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
