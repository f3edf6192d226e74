"""The gateway's serving layer on in-memory fakes of the broker and Redis: no servers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from kubelm_contract import keys, protocol, queues
from kubelm_contract.protocol import Choice
from kubelm_contract.settings import load
from kubelm_runtime.broker import BrokerError, NoSuchQueue, QueueFull
from kubelm_runtime.serve import response_cache
from kubelm_runtime.serve.completions import CompletionService, worker_defaults
from kubelm_runtime.serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_any_request,
    parse_chat_request,
    parse_completion_request,
)
from kubelm_runtime.serve.settings import GatewayConfig

NAMESPACE = "team"
DIGEST = "sha256:" + "ab" * 32


class FakeDispatcher:
    """The broker's RPC pool: records what was sent and answers with what the test scripted."""

    connected = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.cancelled: list[tuple[str, str]] = []
        self.chunks: list[dict[int, Any]] = []
        """Chunk messages a streamed call receives before its reply: ChunkParts, or (offset, text)."""
        self.answer: Any = None
        self.release = asyncio.Event()
        self.release.set()

    async def call(self, queue_name: str, body: bytes, correlation_id: str, timeout: float,
                   headers: dict[str, Any] | None = None, on_chunk: Any = None) -> bytes:
        request = json.loads(body)
        self.calls.append((queue_name, request, headers or {}))
        for chunk in self.chunks:
            on_chunk({index: part if isinstance(part, protocol.ChunkPart) else protocol.ChunkPart(*part)
                      for index, part in chunk.items()})
            await asyncio.sleep(0)
        await self.release.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer is not None:
            return self.answer(request)  # type: ignore[no-any-return]
        choice = Choice(text=" fine", finish_reason="length", prompt_tokens=2, completion_tokens=1)
        n = request.get("n", 1)
        rows = len(request["prompts"]) if "prompts" in request else 1  # a chat request: one conversation
        return protocol.Reply(id=request["id"], choices=(choice,) * (rows * n),
                              model=request["model"], n=n).to_json()

    async def send(self, queue_name: str, body: bytes, correlation_id: str, expiration_seconds: float,
                   headers: dict[str, Any] | None = None) -> None:
        if isinstance(self.answer, BaseException):
            raise self.answer
        self.sent.append((queue_name, json.loads(body), headers or {}))


    async def cancel(self, queue_name: str, correlation_id: str) -> None:
        self.cancelled.append((queue_name, correlation_id))


class MemoryStore:
    """Redis as dicts; `available = False` makes it answer like an unreachable Redis."""

    def __init__(self) -> None:
        self.available = True
        self.down: set[str] = set()
        """Response-cache backends unreachable while Redis is up (memcached)."""
        self.entries: dict[str, dict[str, Any]] = {}
        self.responses: dict[str, Choice] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.reads = 0

    async def registry(self) -> dict[str, dict[str, Any]]:
        return dict(self.entries) if self.available else {}

    async def registry_entry(self, model_id: str) -> dict[str, Any] | None:
        self.reads += 1
        return self.entries.get(model_id) if self.available else None

    async def cached_choices(self, model_id: str, material: list[str],
                             backend: str = "redis") -> tuple[Choice, ...] | None:
        found = [self.responses.get(keys.response(model_id, m)) for m in material]
        return tuple(found) if self.available and all(found) else None  # type: ignore[arg-type]

    def looks_up(self, backend: str) -> bool:
        return self.available and backend not in self.down

    async def put_result(self, key: str, document: dict[str, Any], ttl_seconds: int) -> bool:
        if self.available:
            self.results[key] = document
        return self.available

    async def result(self, key: str) -> dict[str, Any] | None:
        return self.results.get(key) if self.available else None


def make(**config: Any) -> tuple[CompletionService, FakeDispatcher, MemoryStore]:
    """The serving layer for namespace `team`, whose registry lists `tiny` with a digest and the cache on."""
    store = MemoryStore()
    store.entries[keys.model_id(NAMESPACE, "tiny")] = {
        "queue": queues.request_queue(NAMESPACE, "tiny"), "digest": DIGEST, "maxNewTokens": 64,
        "responseCache": True, "defaults": {"max_new_tokens": 16}}
    dispatcher = FakeDispatcher()
    gateway_config = load(GatewayConfig, {"namespace": NAMESPACE, **config})
    return CompletionService(gateway_config, dispatcher, store), dispatcher, store


def request(**fields: Any) -> CompletionRequest:
    return CompletionRequest(**{"model": "tiny", "prompt": "the old fox", **fields})


def refused(coroutine: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        asyncio.run(coroutine)
    return caught.value


def test_a_completion_goes_to_the_models_queue_with_the_registered_defaults() -> None:
    completions, dispatcher, _ = make()
    answer = asyncio.run(completions.complete(request(prompt=["one", "two"])))
    queue, sent, headers = dispatcher.calls[0]
    assert queue == queues.request_queue(NAMESPACE, "tiny")
    assert sent["prompts"] == ["one", "two"]
    assert sent["params"]["max_new_tokens"] == 16  # the model's registered default, not the gateway's
    assert headers[queues.CACHE_CHECKED_HEADER] == 0  # sampled by default: not cacheable, not looked up
    assert [c["text"] for c in answer["choices"]] == [" fine", " fine"]
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert answer["id"] == f"cmpl-{sent['id']}" and answer["kubelm"]["cached"] is False


def test_a_cache_hit_is_answered_without_the_queue_and_a_miss_tells_the_worker_it_was_checked() -> None:
    completions, dispatcher, store = make()
    first = asyncio.run(completions.complete(request(temperature=0, max_tokens=4)))
    assert not first["kubelm"]["cached"]
    assert dispatcher.calls[0][2][queues.CACHE_CHECKED_HEADER] == 1
    entry = store.entries[keys.model_id(NAMESPACE, "tiny")]
    message = protocol.parse_request(json.dumps(dispatcher.calls[0][1]).encode(), worker_defaults(entry),
                                     protocol.Limits(max_new_tokens=64))
    [material] = response_cache.materials(DIGEST, message)  # type: ignore[misc]
    store.responses[keys.response(keys.model_id(NAMESPACE, "tiny"), material)] = Choice(
        text=" cached", finish_reason="length", prompt_tokens=3, completion_tokens=4)
    second = asyncio.run(completions.complete(request(temperature=0, max_tokens=4)))
    assert second["kubelm"]["cached"] and second["choices"][0]["text"] == " cached"
    assert len(dispatcher.calls) == 1
    store.available = False  # a miss that did not consult Redis: the worker must look itself
    asyncio.run(completions.complete(request(temperature=0, max_tokens=5)))
    assert dispatcher.calls[-1][2][queues.CACHE_CHECKED_HEADER] == 0
    # Entries in Memcached, which is down while Redis is up: that miss was not a lookup either.
    store.available, store.down = True, {"memcached"}
    entry["responseCacheBackend"] = "memcached"
    asyncio.run(completions.complete(request(temperature=0, max_tokens=6)))
    assert dispatcher.calls[-1][2][queues.CACHE_CHECKED_HEADER] == 0


def test_routes_are_remembered_briefly_and_configured_models_need_no_registry() -> None:
    completions, _, store = make(models=["pinned"])
    asyncio.run(completions.complete(request()))
    asyncio.run(completions.complete(request()))
    assert store.reads == 1
    store.available = False
    asyncio.run(completions.complete(request(model="pinned")))
    error = refused(completions.complete(request(model="ghost")))
    assert (error.status, error.code) == (404, "model_not_found")
    assert sorted(asyncio.run(completions.models())) == ["pinned"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"n": 17}, "n must be an integer from 1 to 16"),
    ({"n": 16, "prompt": ["a", "b", "c", "d", "e"]}, "prompts times n is 80"),
    ({"logprobs": 2, "echo": True, "stream": True}, "echo with logprobs is not streamed"),
    ({"max_tokens": 65}, "over this model's limit of 64"),
    ({"prompt": ["p"] * (protocol.MAX_PROMPTS + 1)}, "prompts"),
])
def test_what_the_worker_would_refuse_is_refused_before_the_queue(fields: dict[str, Any], message: str) -> None:
    completions, dispatcher, _ = make()
    error = refused(completions.complete(request(**fields)))
    assert error.status == 400 and message in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert not dispatcher.calls


def test_over_max_concurrency_is_429_and_the_slot_comes_back() -> None:
    async def scenario() -> tuple[ApiError | None, dict[str, Any]]:
        completions, dispatcher, _ = make(maxConcurrency=1)
        dispatcher.release.clear()
        first = asyncio.create_task(completions.complete(request()))
        while not dispatcher.calls:
            await asyncio.sleep(0)
        try:
            await completions.complete(request())
            second = None
        except ApiError as e:
            second = e
        dispatcher.release.set()
        await first
        return second, await completions.complete(request())

    error, later = asyncio.run(scenario())
    assert error is not None and error.status == 429 and error.kind == "rate_limit_error"
    assert later["choices"]


@pytest.mark.parametrize(("failure", "status", "message"), [
    (TimeoutError(), 504, "no reply within 30s"),
    (NoSuchQueue("gone"), 503, "has no request queue yet"),
    (QueueFull("full"), 503, "at its queue limit"),
    (BrokerError("not connected to RabbitMQ"), 503, "not connected to RabbitMQ"),
])
def test_broker_failures_map_to_openai_errors(failure: BaseException, status: int, message: str) -> None:
    completions, dispatcher, _ = make(requestTimeoutSeconds=30)
    dispatcher.answer = failure
    error = refused(completions.complete(request()))
    assert error.status == status and message in error.message


@pytest.mark.parametrize(("kind", "status", "error_type"), [
    (protocol.PROMPT_TOO_LONG, 400, "invalid_request_error"),
    (protocol.EXPIRED, 504, "server_error"),
    (protocol.UNAVAILABLE, 503, "server_error"),
    (protocol.INTERNAL, 500, "server_error"),
])
def test_a_workers_error_reply_keeps_its_kind(kind: str, status: int, error_type: str) -> None:
    completions, dispatcher, _ = make()
    dispatcher.answer = lambda sent: protocol.Reply(id=sent["id"], error=(kind, "it went wrong")).to_json()
    error = refused(completions.complete(request()))
    assert (error.status, error.kind, error.code, error.message) == (status, error_type, kind, "it went wrong")


def test_asynchronous_requests_pending_done_failed_and_without_redis() -> None:
    completions, dispatcher, store = make(resultTtlSeconds=120)
    accepted = asyncio.run(completions.submit(request()))
    key = keys.result(accepted["id"])
    assert store.results[key] == {"status": "pending", "model": "tiny"}
    _, sent, headers = dispatcher.sent[0]
    assert headers[queues.RESULT_KEY_HEADER] == key and headers[queues.RESULT_TTL_HEADER] == 120
    # Nobody waits on the connection: the request may wait and run until its result would expire, not
    # only for the synchronous timeout (60 s here).
    assert time.time() + 110 < sent["deadline"] <= time.time() + 120
    assert asyncio.run(completions.result(accepted["id"])) == (202, {"id": accepted["id"], "status": "pending"})

    choice = {"text": " done", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
    store.results[key] = {"status": "done", "reply": {"v": protocol.VERSION, "id": accepted["id"],
                                                      "model": "tiny", "choices": [choice]}}
    status, body = asyncio.run(completions.result(accepted["id"]))
    assert status == 200 and body["completion"]["choices"][0]["text"] == " done"
    store.results[key] = {"status": "done", "reply": json.loads(
        protocol.Reply(id=accepted["id"], error=(protocol.EXPIRED, "too late")).to_json())}
    assert asyncio.run(completions.result(accepted["id"]))[1]["error"] == {"type": "expired", "message": "too late"}
    assert refused(completions.result("unknown")).status == 404

    store.available = False
    error = refused(completions.submit(request()))
    assert error.status == 503 and "need Redis" in error.message
    assert len(dispatcher.sent) == 1


def test_a_client_that_goes_away_cancels_its_request_at_the_workers() -> None:
    async def scenario() -> tuple[ApiError, dict[str, Any], FakeDispatcher]:
        completions, dispatcher, _ = make()
        dispatcher.release.clear()  # no reply comes
        gone = asyncio.Event()
        waiting = asyncio.create_task(completions.complete(request(), gone.wait))
        while not dispatcher.calls:
            await asyncio.sleep(0)
        gone.set()
        try:
            await waiting
        except ApiError as e:
            error = e
        while not dispatcher.cancelled:  # sent on a task of its own
            await asyncio.sleep(0)
        dispatcher.release.set()  # a client that stays gets its reply, and nothing is cancelled
        answered = await completions.complete(request(), asyncio.Event().wait)
        return error, answered, dispatcher

    error, answered, dispatcher = asyncio.run(scenario())
    assert error.status == 499
    assert dispatcher.cancelled == [(queues.request_queue(NAMESPACE, "tiny"), dispatcher.calls[0][1]["id"])]
    assert answered["choices"] and len(dispatcher.cancelled) == 1


def test_n_completions_per_prompt_go_to_the_worker_and_count_each_prompt_once() -> None:
    completions, dispatcher, _ = make()
    answer = asyncio.run(completions.complete(request(prompt=["one", "two"], n=3, temperature=0)))
    _, sent, headers = dispatcher.calls[0]
    assert sent["n"] == 3 and sent["prompts"] == ["one", "two"]
    assert headers[queues.CACHE_CHECKED_HEADER] == 1  # greedy: looked up (a miss here)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3, 4, 5]
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_each_row_of_n_has_its_own_cache_entry_keyed_by_its_own_seed() -> None:
    """A seeded request's samples take seeds s, s + 1, ...: each row is the completion of one seed, so a
    later n = 1 request with seed s + 1 is the second row's entry, and n = 2 again is two hits."""
    completions, dispatcher, store = make()
    asked = {"prompt": "one", "temperature": 1.0, "seed": 7, "max_tokens": 4}
    asyncio.run(completions.complete(request(n=2, **asked)))
    entry = store.entries[keys.model_id(NAMESPACE, "tiny")]
    message = protocol.parse_request(json.dumps(dispatcher.calls[0][1]).encode(), worker_defaults(entry),
                                     protocol.Limits(max_new_tokens=64))
    rows = response_cache.materials(DIGEST, message)
    assert rows is not None and len(set(rows)) == 2
    model = keys.model_id(NAMESPACE, "tiny")
    for material, text in zip(rows, [" seven", " eight"], strict=True):
        store.responses[keys.response(model, material)] = Choice(text, "length", 1, 1)
    both = asyncio.run(completions.complete(request(n=2, **asked)))
    assert [c["text"] for c in both["choices"]] == [" seven", " eight"] and both["kubelm"]["cached"]
    assert both["usage"]["prompt_tokens"] == 1  # n rows of one prompt count it once, from the cache too
    second = asyncio.run(completions.complete(request(**{**asked, "seed": 8})))
    assert [c["text"] for c in second["choices"]] == [" eight"] and second["kubelm"]["cached"]
    assert len(dispatcher.calls) == 1
    greedy = protocol.parse_request(json.dumps({**dispatcher.calls[0][1], "params": {"temperature": 0}}).encode(),
                                    worker_defaults(entry), protocol.Limits(max_new_tokens=64))
    assert len(set(response_cache.materials(DIGEST, greedy) or ())) == 1  # n identical rows share one key


def test_an_unknown_field_is_refused_by_name_and_a_malformed_body_says_what_is_wrong() -> None:
    with pytest.raises(ApiError) as unknown:
        parse_completion_request(b'{"model": "tiny", "prompt": "x", "best_of": 2}')
    assert unknown.value.status == 400 and "best_of: Extra inputs are not permitted" in unknown.value.message
    with pytest.raises(ApiError) as missing:
        parse_completion_request(b'{"prompt": "x", "temperature": -1}')
    assert "model: Field required" in missing.value.message and "temperature" in missing.value.message


def test_openais_penalties_reach_the_worker_and_out_of_range_ones_are_refused() -> None:
    completions, dispatcher, _ = make()
    asyncio.run(completions.complete(request(presence_penalty=0.5, frequency_penalty=-1)))
    params = dispatcher.calls[-1][1]["params"]
    assert (params["presence_penalty"], params["frequency_penalty"]) == (0.5, -1)
    asyncio.run(completions.complete(request()))
    assert "presence_penalty" not in dispatcher.calls[-1][1]["params"]  # not asked: left off the wire
    with pytest.raises(ApiError) as caught:
        parse_completion_request(b'{"model": "tiny", "prompt": "x", "frequency_penalty": 2.5}')
    assert caught.value.status == 400 and "frequency_penalty" in caught.value.message


def events_of(completions: CompletionService, body: CompletionRequest | ChatCompletionRequest) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [event async for event in completions.stream(body)]

    return asyncio.run(collect())


def test_a_stream_relays_chunks_as_they_come_and_the_reply_finishes_each_choice() -> None:
    completions, dispatcher, _ = make()
    dispatcher.chunks = [{0: (0, " fi"), 1: (0, " ne")},
                         {0: (0, " fi")},  # a chunk delivered twice adds nothing
                         {0: (3, "n")}]
    events = events_of(completions, request(prompt=["one", "two"], stream=True,
                                            stream_options={"include_usage": True}))
    assert dispatcher.calls[0][1]["stream"] is True
    texts = [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"])
             for e in events if e["choices"]]
    assert texts == [(0, " fi", None), (1, " ne", None), (0, "n", None), (0, "e", "length"), (1, "", "length")]
    assert "".join(t for i, t, _ in texts if i == 0) == " fine"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    assert all(e["usage"] is None for e in events[:-1])  # as OpenAI's: the field, null, until the last
    assert {e["id"] for e in events} == {f"cmpl-{dispatcher.calls[0][1]['id']}"}
    sample = completions.metrics.registry.get_sample_value
    assert sample("kubelm_gateway_time_to_first_token_seconds_count", {"model": "tiny"}) == 1
    assert sample("kubelm_gateway_latency_seconds_count", {"model": "tiny"}) == 1
    assert all(e["object"] == "text_completion" for e in events)


def test_a_choice_that_ends_first_streams_its_finish_reason_when_it_ends() -> None:
    """n = 2: choice 1 ends while choice 0 goes on; its end is relayed at once (as OpenAI streams it), once,
    and the reply finishes only choice 0."""
    completions, dispatcher, _ = make()
    dispatcher.chunks = [{0: (0, " fi"), 1: protocol.ChunkPart(0, " fine", finish_reason="length")},
                         {1: protocol.ChunkPart(0, " fine", finish_reason="length")},  # delivered twice
                         {0: (3, "n")}]
    events = events_of(completions, request(n=2, stream=True))
    texts = [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"])
             for e in events if e["choices"]]
    assert texts == [(0, " fi", None), (1, " fine", "length"), (0, "n", None), (0, "e", "length")]
    assert not any("usage" in e for e in events)  # not asked for
    # A chunk of choice 1 lost before its last one: that end is not streamed, the reply brings the rest.
    dispatcher.chunks = [{0: (0, " fi"), 1: (0, " f")},
                         {1: protocol.ChunkPart(4, "e", finish_reason="length")}]  # " f" + "in" went missing
    events = events_of(completions, request(n=2, stream=True))
    texts = [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"])
             for e in events if e["choices"]]
    assert texts == [(0, " fi", None), (1, " f", None), (0, "ne", "length"), (1, "ine", "length")]


def test_a_stream_with_logprobs_relays_each_tokens_once_and_the_reply_brings_the_rest() -> None:
    completions, dispatcher, _ = make()
    fi, n, e = (protocol.TokenLogprob(t, lp, ((t, lp),)) for t, lp in ((" fi", -0.5), ("n", -1.0), ("e", -2.0)))
    dispatcher.chunks = [{0: protocol.ChunkPart(0, " fi", 0, (fi,))},
                         {0: protocol.ChunkPart(0, " fin", 0, (fi, n))},  # overlapping: only what is new
                         {0: protocol.ChunkPart(5, "x", 3, (e,))}]  # past what was sent: a chunk went missing
    dispatcher.answer = lambda sent: protocol.Reply(id=sent["id"], choices=(
        Choice(" fine", "length", 2, 3, (fi, n, e)),)).to_json()
    events = events_of(completions, request(stream=True, logprobs=1))
    forms = [e["choices"][0]["logprobs"] for e in events]
    assert [f["tokens"] for f in forms] == [[" fi"], ["n"], ["e"]]
    assert [f["text_offset"] for f in forms] == [[0], [3], [4]]
    assert [f["top_logprobs"] for f in forms] == [[{" fi": -0.5}], [{"n": -1.0}], [{"e": -2.0}]]
    assert "".join(e["choices"][0]["text"] for e in events) == " fine"
    plain = events_of(completions, request(stream=True))
    assert all(e["choices"][0]["logprobs"] is None for e in plain)
    chat_events = events_of(completions, chat(stream=True, logprobs=True, top_logprobs=1))
    assert [[t["token"] for t in e["choices"][0]["logprobs"]["content"]] for e in chat_events] == [
        [" fi"], ["n"], ["e"]]


def test_a_stream_that_lost_a_chunk_gets_the_rest_from_the_reply_and_errors_are_raised() -> None:
    completions, dispatcher, _ = make()
    dispatcher.chunks = [{0: (2, "ne")}]  # starts past what was streamed: the chunk before it went missing
    texts = [e["choices"][0]["text"] for e in events_of(completions, request(stream=True))]
    assert "".join(texts) == " fine"
    dispatcher.answer = TimeoutError()
    with pytest.raises(ApiError) as timed_out:
        events_of(completions, request(stream=True))
    assert timed_out.value.status == 504


def test_a_streamed_cache_hit_is_one_event_per_choice() -> None:
    completions, dispatcher, store = make()
    asyncio.run(completions.complete(request(temperature=0, max_tokens=4)))
    entry = store.entries[keys.model_id(NAMESPACE, "tiny")]
    message = protocol.parse_request(json.dumps(dispatcher.calls[0][1]).encode(), worker_defaults(entry),
                                     protocol.Limits(max_new_tokens=64))
    [material] = response_cache.materials(DIGEST, message)  # type: ignore[misc]
    store.responses[keys.response(keys.model_id(NAMESPACE, "tiny"), material)] = Choice(" cached", "stop", 3, 1)
    events = events_of(completions, request(temperature=0, max_tokens=4, stream=True))
    assert [e["choices"][0]["text"] for e in events] == [" cached"] and len(dispatcher.calls) == 1


def test_a_stream_whose_consumer_goes_away_cancels_the_request_at_the_workers() -> None:
    async def scenario() -> FakeDispatcher:
        completions, dispatcher, _ = make()
        dispatcher.chunks = [{0: (0, " fi")}]
        dispatcher.release.clear()
        events = completions.stream(request(stream=True))
        first = await anext(events)
        assert first["choices"][0]["text"] == " fi"
        await events.aclose()  # what the server does when the client disconnects mid-stream
        while not dispatcher.cancelled:
            await asyncio.sleep(0)
        return dispatcher

    dispatcher = asyncio.run(scenario())
    assert dispatcher.cancelled == [(queues.request_queue(NAMESPACE, "tiny"), dispatcher.calls[0][1]["id"])]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "tiny", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        **fields})


def test_a_chat_completion_sends_the_conversation_and_answers_in_chat_shape() -> None:
    completions, dispatcher, _ = make()
    answer = asyncio.run(completions.complete(chat(max_completion_tokens=5, max_tokens=9, temperature=0, n=2)))
    _, sent, headers = dispatcher.calls[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert "prompts" not in sent and sent["n"] == 2
    assert (sent["params"]["max_new_tokens"], sent["params"]["temperature"]) == (5, 0)  # max_completion_tokens wins
    # The gateway cannot render the conversation, so it cannot look in the cache; the worker will.
    assert headers[queues.CACHE_CHECKED_HEADER] == 0
    assert answer["object"] == "chat.completion" and answer["id"] == f"chatcmpl-{sent['id']}"
    assert answer["choices"] == [
        {"index": i, "message": {"role": "assistant", "content": " fine", "refusal": None}, "logprobs": None,
         "finish_reason": "length"} for i in (0, 1)]
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_a_streamed_chat_says_the_role_first_and_the_finish_reason_last() -> None:
    completions, dispatcher, _ = make()
    dispatcher.chunks = [{0: (0, " fi")}, {0: (3, "n")}]
    events = events_of(completions, chat(stream=True, stream_options={"include_usage": True}))
    deltas = [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events if e["choices"]]
    assert deltas == [({"role": "assistant", "content": " fi"}, None), ({"content": "n"}, None),
                      ({"content": "e"}, "length")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 1
    assert {e["object"] for e in events} == {"chat.completion.chunk"}


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "tiny", "messages": []}, "messages: List should have at least 1 item"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools: Extra inputs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
])
def test_a_chat_request_is_refused_with_what_is_wrong(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat_request(json.dumps(body).encode())
    assert caught.value.status == 400 and message in caught.value.message


def test_log_probabilities_are_asked_of_the_worker_and_answered_in_each_apis_form() -> None:
    completions, dispatcher, _ = make()
    tokens = (protocol.TokenLogprob(" fi", -0.5, ((" fi", -0.5), (" so", -1.25))),
              protocol.TokenLogprob("ne", -0.25, (("ne", -0.25), ("sh", -2.0))))

    def answer(request: dict[str, Any]) -> bytes:
        return protocol.Reply(id=request["id"], model="tiny", choices=(
            Choice(" fine", "length", 2, 2, tokens),)).to_json()
    dispatcher.answer = answer
    found = asyncio.run(completions.complete(request(logprobs=2, temperature=0)))
    assert dispatcher.calls[-1][1]["params"]["logprobs"] == 2
    assert found["choices"][0]["logprobs"] == {
        "tokens": [" fi", "ne"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{" fi": -0.5, " so": -1.25}, {"ne": -0.25, "sh": -2.0}], "text_offset": [0, 3]}
    chatted = asyncio.run(completions.complete(chat(logprobs=True, top_logprobs=2)))
    assert dispatcher.calls[-1][1]["params"]["logprobs"] == 2
    assert chatted["choices"][0]["logprobs"]["content"][1] == {
        "token": "ne", "logprob": -0.25, "bytes": [110, 101],
        "top_logprobs": [{"token": "ne", "logprob": -0.25, "bytes": [110, 101]},
                         {"token": "sh", "logprob": -2.0, "bytes": [115, 104]}]}
    asyncio.run(completions.complete(chat(logprobs=True)))
    assert dispatcher.calls[-1][1]["params"]["logprobs"] == 0  # the chosen tokens only
    asyncio.run(completions.complete(chat()))
    assert "logprobs" not in dispatcher.calls[-1][1]["params"]  # not asked: left off the wire
    with pytest.raises(ApiError, match="top_logprobs needs logprobs"):
        parse_chat_request(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                       "top_logprobs": 2}).encode())


def test_echo_puts_each_prompt_before_its_completions() -> None:
    completions, _, _ = make()
    found = asyncio.run(completions.complete(request(prompt=["one", "two"], n=2, echo=True)))
    assert [c["text"] for c in found["choices"]] == ["one fine", "one fine", "two fine", "two fine"]
    events = events_of(completions, request(prompt="one", echo=True, stream=True))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "one fine"


def test_a_streamed_echo_waits_for_text_so_that_a_refusal_stays_an_http_error() -> None:
    """The first event starts the HTTP answer: were the prompt sent before the queue refused the request,
    the client would get a 200 with an error event instead of the 503 its retry logic knows."""
    async def first_event() -> Any:
        completions, dispatcher, _ = make()

        async def refused(*args: Any, **kwargs: Any) -> bytes:
            raise QueueFull("full")
        dispatcher.call = refused  # type: ignore[method-assign]
        return await anext(completions.stream(request(prompt="one", echo=True, stream=True)))

    with pytest.raises(ApiError) as caught:
        asyncio.run(first_event())
    assert caught.value.status == 503


def test_an_asynchronous_request_is_refused_echo_which_its_result_would_not_keep() -> None:
    completions, dispatcher, _ = make()
    error = refused(completions.submit(request(echo=True)))
    assert error.status == 400 and "echo" in error.message and not dispatcher.sent


def test_echo_with_logprobs_asks_the_worker_for_the_prompts_and_puts_them_first() -> None:
    completions, dispatcher, _ = make()
    prompt_part = (protocol.TokenLogprob("one", None), protocol.TokenLogprob(" two", -3.0, ((" two", -3.0),)))
    dispatcher.answer = lambda sent: protocol.Reply(id=sent["id"], choices=(Choice(
        " fine", "length", 2, 1, (protocol.TokenLogprob(" fine", -0.5, ((" fine", -0.5),)),), prompt_part),)).to_json()
    found = asyncio.run(completions.complete(request(prompt="one two", echo=True, logprobs=1)))
    assert dispatcher.calls[0][1]["params"]["prompt_logprobs"] is True
    choice = found["choices"][0]
    assert choice["text"] == "one two fine"
    assert choice["logprobs"] == {"tokens": ["one", " two", " fine"], "token_logprobs": [None, -3.0, -0.5],
                                  "top_logprobs": [None, {" two": -3.0}, {" fine": -0.5}], "text_offset": [0, 3, 7]}
    asyncio.run(completions.complete(request(prompt="one two", logprobs=1)))
    assert "prompt_logprobs" not in dispatcher.calls[1][1]["params"]


def test_an_asynchronous_chat_goes_as_its_conversation_and_its_result_is_a_chat_completion() -> None:
    completions, dispatcher, store = make()
    accepted = asyncio.run(completions.submit(chat(max_completion_tokens=3)))
    _, sent, _ = dispatcher.sent[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert "prompts" not in sent
    reply = protocol.Reply(id=accepted["id"], choices=(Choice(" hi", "stop", 4, 1),), model="tiny")
    store.results[keys.result(accepted["id"])] = protocol.result_document(reply, chat=True)
    status, body = asyncio.run(completions.result(accepted["id"]))
    assert status == 200 and body["completion"]["object"] == "chat.completion"
    assert body["completion"]["choices"][0]["message"] == {"role": "assistant", "content": " hi", "refusal": None}
    store.results[keys.result(accepted["id"])] = protocol.result_document(reply)
    assert asyncio.run(completions.result(accepted["id"]))[1]["completion"]["object"] == "text_completion"
    assert "not streamed" in refused(completions.submit(chat(stream=True))).message


def test_either_api_body_is_told_apart_by_its_messages() -> None:
    assert isinstance(parse_any_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'),
                      ChatCompletionRequest)
    assert isinstance(parse_any_request(b'{"model": "m", "prompt": "x"}'), CompletionRequest)
    assert "prompt: Field required" in refused_now(lambda: parse_any_request(b'{"model": "m"}')).message
    assert "valid JSON" in refused_now(lambda: parse_any_request(b"{")).message
    assert "JSON object" in refused_now(lambda: parse_any_request(b"[]")).message
    # A lone surrogate escape: refused here, as the synchronous routes refuse it, before it is queued.
    for body in (b'{"model": "m", "prompt": "a\\ud800b"}',
                 b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}'):
        assert refused_now(lambda body=body: parse_any_request(body)).status == 400  # type: ignore[misc]


def refused_now(call: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value
