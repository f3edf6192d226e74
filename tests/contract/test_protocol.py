from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import pytest

from kubelm_contract import protocol, queues
from kubelm_contract.protocol import Choice, Decoding, Limits, ProtocolError, Reply

DEFAULTS, LIMITS = Decoding(max_new_tokens=16), Limits(max_input_tokens=64, max_new_tokens=32)


def parse(body: object) -> protocol.Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.parse_request(raw, DEFAULTS, LIMITS)


def test_valid_request_takes_defaults_and_round_trips() -> None:
    request = parse({"id": "r-1", "prompt": "hello", "params": {"temperature": 0, "stop": "."}})
    assert request.prompts == ("hello",) and request.decoding.max_new_tokens == 16
    assert request.decoding.stop == (".",) and request.decoding.deterministic
    assert parse(request.to_json()) == request


def test_a_chat_request_carries_its_conversation_until_the_worker_renders_it() -> None:
    request = parse({"id": "c-1", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}], "n": 2, "stream": True})
    assert request.messages == (("system", "Be brief."), ("user", "Hi")) and request.prompts == ()
    assert parse(request.to_json()) == request
    rendered = protocol.with_prompt(request, "system: Be brief.\nuser: Hi\nassistant:")
    assert rendered.prompts == ("system: Be brief.\nuser: Hi\nassistant:",) and rendered.messages == request.messages
    assert len(rendered.samples()) == 2


@pytest.mark.parametrize(("body", "kind", "message"), [
    (b"{not json", protocol.INVALID_REQUEST, "not valid JSON"),
    (b"\xff\xfe", protocol.INVALID_REQUEST, "not valid JSON"),
    ([], protocol.INVALID_REQUEST, "must be a JSON object"),
    ({"prompt": "x"}, protocol.INVALID_REQUEST, "id must be"),
    ({"id": "a b", "prompt": "x"}, protocol.INVALID_REQUEST, "id must be"),
    ({"id": "a"}, protocol.INVALID_REQUEST, "prompts must be a list"),
    ({"id": "a", "prompts": []}, protocol.INVALID_REQUEST, "prompts must be a list"),
    ({"id": "a", "prompts": [1]}, protocol.INVALID_REQUEST, "prompts must be a list"),
    ({"id": "a", "prompt": "x", "prompts": ["y"]}, protocol.INVALID_REQUEST, "one of prompt, prompts or messages"),
    ({"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, protocol.INVALID_REQUEST,
     "one of prompt, prompts or messages"),
    ({"id": "a", "messages": []}, protocol.INVALID_REQUEST, "messages must be a list of 1 to 256"),
    ({"id": "a", "messages": [{"role": "robot", "content": "x"}]}, protocol.INVALID_REQUEST, "messages[0].role"),
    ({"id": "a", "messages": [{"role": "user", "content": ["x"]}]}, protocol.INVALID_REQUEST,
     "messages[0].content must be a string"),
    ({"id": "a", "messages": [{"role": "user"}]}, protocol.INVALID_REQUEST, "exactly role and content"),
    ({"id": "a", "messages": [{"role": "user", "content": "x" * 600_000}] * 2}, protocol.PROMPT_TOO_LONG,
     "longer than"),
    ({"id": "a", "prompt": "x", "extra": 1}, protocol.INVALID_REQUEST, "unknown field(s): extra"),
    ({"id": "a", "prompt": "x", "params": {"temprature": 1}}, protocol.INVALID_REQUEST, "unknown parameter(s)"),
    ({"id": "a", "prompt": "x", "params": {"max_new_tokens": 33}}, protocol.INVALID_REQUEST, "max_new_tokens"),
    ({"id": "a", "prompt": "x", "params": {"max_new_tokens": "5"}}, protocol.INVALID_REQUEST, "integer"),
    ({"id": "a", "prompt": "x", "params": {"temperature": -1}}, protocol.INVALID_REQUEST, "temperature"),
    ({"id": "a", "prompt": "x", "params": {"top_p": 0}}, protocol.INVALID_REQUEST, "top_p"),
    ({"id": "a", "prompt": "x", "params": {"stop": ["", "x"]}}, protocol.INVALID_REQUEST, "stop"),
    ({"id": "a", "prompt": "x", "params": {"seed": True}}, protocol.INVALID_REQUEST, "seed"),
    ({"id": "a", "prompt": "x", "params": {"presence_penalty": 2.5}}, protocol.INVALID_REQUEST, "presence_penalty"),
    ({"id": "a", "prompt": "x", "params": {"frequency_penalty": "1"}}, protocol.INVALID_REQUEST,
     "frequency_penalty"),
    ({"id": "a", "prompt": "x", "v": 2}, protocol.INVALID_REQUEST, "version"),
    ({"id": "a", "prompt": "x", "deadline": "soon"}, protocol.INVALID_REQUEST, "deadline"),
    ({"id": "a", "prompt": "x" * 1_000_001}, protocol.PROMPT_TOO_LONG, "longer than"),
    # JSON escapes a lone surrogate, which no tokenizer, cache key or reply can encode.
    ({"id": "a", "prompt": "a\ud800b"}, protocol.INVALID_REQUEST, "valid Unicode"),
    ({"id": "a", "messages": [{"role": "user", "content": "\udfff"}]}, protocol.INVALID_REQUEST, "valid Unicode"),
    ({"id": "a", "prompt": "x", "params": {"stop": ["\ud83d"]}}, protocol.INVALID_REQUEST, "valid Unicode"),
])
def test_invalid_requests(body: object, kind: str, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(body)
    assert info.value.kind == kind and message in str(info.value)


def test_limits_at_and_past_their_edges() -> None:
    """64 prompts, ids of 128 characters, 4 stop strings of 64 characters: accepted; one more is refused."""
    assert len(parse({"id": "a", "prompts": ["x"] * protocol.MAX_PROMPTS}).prompts) == 64
    with pytest.raises(ProtocolError, match="prompts"):
        parse({"id": "a", "prompts": ["x"] * (protocol.MAX_PROMPTS + 1)})
    assert parse({"id": "i" * 128, "prompt": "x"}).id == "i" * 128
    with pytest.raises(ProtocolError, match="id must be 1-128 characters"):
        parse({"id": "i" * 129, "prompt": "x"})
    stops = ["s" * 64] * protocol.MAX_STOP_SEQUENCES
    assert parse({"id": "a", "prompt": "x", "params": {"stop": stops}}).decoding.stop == tuple(stops)
    for too_many in ([*stops, "t"], ["s" * 65]):
        with pytest.raises(ProtocolError, match="up to 4 non-empty strings of at most 64 characters"):
            parse({"id": "a", "prompt": "x", "params": {"stop": too_many}})


def test_prompt_logprobs_need_logprobs_and_parameters_at_their_defaults_stay_off_the_wire() -> None:
    asked = parse({"id": "a", "prompt": "x", "params": {"logprobs": 2, "prompt_logprobs": True}})
    assert asked.decoding.prompt_logprobs and parse(asked.to_json()) == asked
    with pytest.raises(ProtocolError, match=r"prompt_logprobs needs params\.logprobs"):
        parse({"id": "a", "prompt": "x", "params": {"prompt_logprobs": True}})
    with pytest.raises(ProtocolError, match="true or false"):
        parse({"id": "a", "prompt": "x", "params": {"logprobs": 1, "prompt_logprobs": 1}})
    plain = json.loads(parse({"id": "a", "prompt": "x"}).to_json())["params"]
    assert "logprobs" not in plain and "prompt_logprobs" not in plain  # a worker without them takes it
    choice = Choice("hi", "stop", 2, 1, (protocol.TokenLogprob("hi", -1.0),),
                    (protocol.TokenLogprob("a", None), protocol.TokenLogprob(" b", -2.5, ((" b", -2.5),))))
    assert Choice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_reply_round_trip_and_errors() -> None:
    reply = Reply("r", (Choice("hi", "stop", 3, 1),), timings={"generate_ms": 2.0}, model="m")
    data = json.loads(reply.to_json())
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 1} and data["ok"]
    assert Reply.from_json(reply.to_json()) == reply
    error = protocol.error_reply("r", protocol.EXPIRED, "too late")
    assert Reply.from_json(error.to_json()).error == (protocol.EXPIRED, "too late")


def test_cache_key_depends_on_model_prompt_and_parameters() -> None:
    base = protocol.cache_key_material("sha256:a", "hi", Decoding(temperature=0))
    assert base == protocol.cache_key_material("sha256:a", "hi", Decoding(temperature=0))
    assert base == protocol.cache_key_material("sha256:a", "hi".replace("\n", "\r\n"), Decoding(temperature=0))
    assert base != protocol.cache_key_material("sha256:b", "hi", Decoding(temperature=0))
    assert base != protocol.cache_key_material("sha256:a", "hi!", Decoding(temperature=0))
    assert base != protocol.cache_key_material("sha256:a", "hi", Decoding(temperature=0, max_new_tokens=3))
    assert not Decoding(temperature=0.7).deterministic and Decoding(temperature=0.7, seed=1).deterministic


def test_queue_arguments() -> None:
    quorum = queues.request_queue_arguments("ns", "m", queues.QueueSpec(max_length=10, message_ttl_seconds=5))
    assert quorum == {"x-queue-type": "quorum", "x-max-length": 10, "x-overflow": "reject-publish",
                      "x-message-ttl": 5000, "x-delivery-limit": 3, "x-dead-letter-exchange": "kubelm.dead-letter",
                      "x-dead-letter-routing-key": "kubelm.ns.m.dead"}
    classic = queues.request_queue_arguments("ns", "m", queues.QueueSpec(type="classic", dead_letter=False))
    assert classic == {"x-queue-type": "classic"}


def test_a_cancellation_names_one_request_and_anything_else_is_not_one() -> None:
    assert queues.parse_cancel_message(queues.cancel_message("abc-1")) == "abc-1"
    for body in (b"not json", b'{"id": 7}', b"[1]", b"\xff"):
        assert queues.parse_cancel_message(body) is None


def test_n_samples_per_prompt_take_consecutive_seeds_and_stay_within_the_row_limit() -> None:
    raw = json.dumps({"v": 1, "id": "r", "prompts": ["a", "b"], "n": 3, "params": {"seed": 7}}).encode()
    request = protocol.parse_request(raw, Decoding(), Limits())
    assert request.n == 3 and protocol.parse_request(request.to_json(), Decoding(), Limits()) == request
    assert [(p, d.seed) for p, d in request.samples()] == [("a", 7), ("a", 8), ("a", 9), ("b", 7), ("b", 8), ("b", 9)]
    greedy = protocol.parse_request(json.dumps({"v": 1, "id": "g", "prompt": "a", "n": 2}).encode(), Decoding(),
                                    Limits())
    assert [d.seed for _, d in greedy.samples()] == [None, None]
    for n, message in ((0, "n must be an integer"), (True, "n must be an integer"), (17, "from 1 to 16")):
        with pytest.raises(ProtocolError, match=message):
            protocol.parse_request(json.dumps({"v": 1, "id": "x", "prompt": "a", "n": n}).encode(), Decoding(),
                                   Limits())
    with pytest.raises(ProtocolError, match="prompts times n is 66"):
        protocol.parse_request(json.dumps({"v": 1, "id": "x", "prompts": ["a"] * 33, "n": 2}).encode(), Decoding(),
                               Limits())
    reply = Reply(id="r", choices=(Choice("x", "stop", 5, 2),) * 6, n=3)
    assert json.loads(reply.to_json())["usage"] == {"prompt_tokens": 10, "completion_tokens": 12}
    assert Reply.from_json(reply.to_json()).n == 3


def test_a_grouped_chunk_message_carries_each_requests_parts_by_correlation_id() -> None:
    first = {0: protocol.ChunkPart(0, " the"), 1: protocol.ChunkPart(3, "x", 1, (protocol.TokenLogprob("x", -1.0),))}
    second = {0: protocol.ChunkPart(5, " fox")}
    raw = protocol.chunks_message({"a": first, "b": second})
    assert protocol.parse_chunks_message(raw) == {"a": first, "b": second}
    assert protocol.parse_chunk_message(protocol.chunk_message("a", first)) == first
    assert protocol.parse_chunks_message(b"{}") == {} and protocol.parse_chunk_message(b"[") == {}


def test_openai_penalties_travel_and_key_cache_entries_only_when_set() -> None:
    plain = protocol.Request(id="r", prompts=("p",), decoding=Decoding(temperature=0))
    assert b"penalty" not in plain.to_json().replace(b"repetition_penalty", b"")
    penalised = protocol.Request(id="r", prompts=("p",),
                                 decoding=Decoding(max_new_tokens=16, temperature=0, presence_penalty=-1.0,
                                                   frequency_penalty=0.5))
    assert parse(json.loads(penalised.to_json())).decoding == penalised.decoding
    # At their defaults the key is the one computed before the fields existed: cached entries still hit.
    before = json.dumps({k: v for k, v in {**asdict(Decoding(temperature=0)), "stop": []}.items()
                         if k not in ("logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty")},
                        sort_keys=True)
    assert protocol.cache_key_material("d", "p", Decoding(temperature=0)) == hashlib.sha256(
        f"d\0p\0{before}".encode()).hexdigest()
    assert protocol.cache_key_material("d", "p", penalised.decoding) != protocol.cache_key_material(
        "d", "p", Decoding(temperature=0))


def test_a_chunk_carries_a_finish_reason_only_when_its_choice_ended() -> None:
    parts = {0: protocol.ChunkPart(0, "a"), 1: protocol.ChunkPart(2, "b", finish_reason="stop")}
    raw = protocol.chunk_message("r", parts)
    assert protocol.parse_chunk_message(raw) == parts
    assert json.loads(raw)["chunks"][0] == {"index": 0, "offset": 0, "text": "a"}  # as before the field
    assert protocol.parse_chunks_message(protocol.chunks_message({"r": parts})) == {"r": parts}


def test_queue_names_fit_amqp_for_the_longest_names_kubernetes_allows() -> None:
    assert queues.request_queue("ns", "m") == "kubelm.ns.m.requests"
    namespace, long = "n" * 63, "m" * 253
    names = {queues.request_queue(namespace, long), queues.request_queue(namespace, long[:-1] + "x"),
             queues.dead_letter_queue(namespace, long)}
    assert len(names) == 3  # cut names stay apart by the hash of the whole identity
    for name in names:
        assert len(name.encode()) <= 255 and name.startswith(f"kubelm.{namespace}.mmm"), name
    assert queues.request_queue(namespace, long).endswith(".requests")
    assert queues.dead_letter_queue(namespace, long).endswith(".dead")
