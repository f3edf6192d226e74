"""The LanguageModel spec sections the serving runtime consumes as they are.

The operator parses a LanguageModel's spec with these classes and renders them into the
workers' configuration; the runtime reads the same classes back. Names and defaults equal
the CRD's (tests keep them in step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .protocol import Decoding, Limits
from .queues import QueueSpec
from .settings import SettingsError


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    chat_template: str | None = None
    """Renders chat messages into the prompt (Jinja, as Hugging Face chat templates); None: the
    tokenizer's own, else kubelm's default."""

    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                        tuple(self.stop))


@dataclass(frozen=True)
class LimitsSpec:
    max_input_tokens: int = 1024
    max_new_tokens: int = 512

    def limits(self) -> Limits:
        return Limits(self.max_input_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 16
    max_wait_millis: int = 10
    max_prefill_tokens: int | None = None
    """Prompt tokens prefilled together at most; requests beyond join at the next steps. None: no limit
    (and no field in a worker's configuration, which a runtime from before it would refuse)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_wait_millis < 0:
            raise SettingsError("batching.maxBatchSize must be >= 1 and maxWaitMillis >= 0")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise SettingsError("batching.maxPrefillTokens must be >= 1 (leave it out for no limit)")


@dataclass(frozen=True)
class Queue(QueueSpec):
    """The spec's queue section: the arguments the queue is declared with, plus what happens on deletion."""

    deletion_policy: Literal["Delete", "Retain"] = "Delete"


@dataclass(frozen=True)
class Responses:
    enabled: bool = True
    ttl_seconds: int = 3600
    backend: Literal["redis", "memcached"] = "redis"
    """Where entries live; hit and miss counters stay in Redis either way."""


@dataclass(frozen=True)
class Cache:
    responses: Responses = field(default_factory=Responses)
    deletion_policy: Literal["Delete", "Retain"] = "Delete"
