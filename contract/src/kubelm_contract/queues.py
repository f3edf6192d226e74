"""RabbitMQ names and queue arguments for a served model.

The operator declares these queues and the workers declare them too (declaring
is idempotent when the arguments match), so a worker also runs stand-alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

DEAD_LETTER_EXCHANGE = "kubelm.dead-letter"
"""A direct exchange; each model's dead-letter queue is bound with its own routing key."""
DEFAULT_DELIVERY_LIMIT = 3
CANCEL_EXCHANGE = "kubelm.cancel"
"""A direct exchange for cancellations: a gateway whose client went away publishes the request's id
with the request queue's name as routing key, and every worker consuming that queue receives it on a
queue of its own connection."""

# Headers the runtime sets on messages it dead-letters itself (RabbitMQ adds x-death on its own).
ERROR_TYPE_HEADER = "kubelm-error-type"
ERROR_MESSAGE_HEADER = "kubelm-error"
RESULT_KEY_HEADER = "kubelm-result-key"
"""Asynchronous requests: the worker also stores the reply in Redis under this key..."""
RESULT_TTL_HEADER = "kubelm-result-ttl"
"""...for this many seconds."""
CACHE_CHECKED_HEADER = "kubelm-cache-checked"
"""Set by a gateway that already missed the response cache: the worker need not look again."""
SENT_AT_HEADER = "kubelm-sent-at"
"""Publish time in Unix milliseconds (an integer: AMQP tables carry no floats), for queue-wait metrics."""


AMQP_NAME_MAX = 255
"""Bytes in an AMQP short string: queue names and routing keys."""


def _name(namespace: str, model: str, suffix: str) -> str:
    """kubelm.<namespace>.<model>.<suffix>, within AMQP's limit: a model name of up to 253 characters in a
    namespace of up to 63 does not fit, so its name is cut and a hash of the full identity keeps it apart."""
    full = f"kubelm.{namespace}.{model}.{suffix}"
    if len(full.encode()) <= AMQP_NAME_MAX:
        return full
    tag = hashlib.sha256(f"{namespace}/{model}".encode()).hexdigest()[:12]
    room = AMQP_NAME_MAX - len(f"kubelm.{namespace}..{suffix}".encode()) - len(tag) - 1
    return f"kubelm.{namespace}.{model[:room]}-{tag}.{suffix}"


def request_queue(namespace: str, model: str) -> str:
    return _name(namespace, model, "requests")


def dead_letter_queue(namespace: str, model: str) -> str:
    return _name(namespace, model, "dead")


@dataclass(frozen=True)
class QueueSpec:
    """The LanguageModel spec's queue section."""

    type: Literal["classic", "quorum"] = "quorum"
    max_length: int | None = None
    message_ttl_seconds: int | None = None
    delivery_limit: int | None = None
    dead_letter: bool = True


def request_queue_arguments(namespace: str, model: str, spec: QueueSpec) -> dict[str, object]:
    args: dict[str, object] = {"x-queue-type": spec.type}
    if spec.max_length is not None:
        # Reject new requests when full so callers see back-pressure instead of losing old ones.
        args["x-max-length"] = spec.max_length
        args["x-overflow"] = "reject-publish"
    if spec.message_ttl_seconds is not None:
        args["x-message-ttl"] = spec.message_ttl_seconds * 1000
    if spec.type == "quorum":
        args["x-delivery-limit"] = spec.delivery_limit or DEFAULT_DELIVERY_LIMIT
    if spec.dead_letter:
        args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
        args["x-dead-letter-routing-key"] = dead_letter_queue(namespace, model)
    return args


def declare_model_queues(channel: Any, namespace: str, model: str, spec: QueueSpec, *,
                         exchange: bool = True) -> str:
    """Declares the dead-letter exchange and queue and the request queue on an AMQP channel (pika's
    interface; idempotent while the arguments match) and returns the request queue's name. Workers and
    the operator both call this, so a queue is declared the same way whoever comes first. `exchange=False`
    skips declaring the shared dead-letter exchange, for a caller that did on this connection already."""
    name = request_queue(namespace, model)
    if spec.dead_letter:
        dead = dead_letter_queue(namespace, model)
        if exchange:
            channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="direct", durable=True)
        channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "classic"})
        channel.queue_bind(dead, DEAD_LETTER_EXCHANGE, routing_key=dead)
    channel.queue_declare(name, durable=True, arguments=request_queue_arguments(namespace, model, spec))
    return name


def declare_cancel_exchange(channel: Any) -> None:
    """Declares the cancellation exchange (idempotent): whoever publishes or binds to it first."""
    channel.exchange_declare(CANCEL_EXCHANGE, exchange_type="direct", durable=True)


def cancel_message(request_id: str) -> bytes:
    return json.dumps({"v": 1, "id": request_id}).encode()


def parse_cancel_message(body: bytes) -> str | None:
    """The request id a cancellation names; None for a body that is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    request_id = data.get("id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) else None
