"""Serving configuration: the LanguageModel spec's sections plus what only the pod knows.

Names and defaults follow crds/languagemodels.kubelm.io.yaml (a test keeps them in step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubelm_contract.serving import Batching, Cache, Generation, LimitsSpec, Queue, Responses
from kubelm_contract.settings import SettingsError

from ..config import ModelSource

__all__ = ["Batching", "Cache", "GatewayConfig", "Generation", "LimitsSpec", "Queue", "Responses",
           "ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    name: str
    """The LanguageModel's name: names the queue and the registry entry."""
    model: ModelSource
    namespace: str = "default"
    generation: Generation = field(default_factory=Generation)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    batching: Batching = field(default_factory=Batching)
    queue: Queue = field(default_factory=Queue)
    cache: Cache = field(default_factory=Cache)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    cache_dir: str = "/var/cache/kubelm"
    health_port: int = 8081
    liveness_timeout_seconds: float = 120.0
    """A worker whose loop has not turned for this long reports itself stuck."""
    redis_retry_seconds: float = 30.0
    """After Redis fails to answer, serving goes on without the response cache and tries Redis again
    only after this long, so an unreachable Redis costs one connection timeout per period, not per batch."""

    def __post_init__(self) -> None:
        if self.generation.max_new_tokens > self.limits.max_new_tokens:
            raise SettingsError("generation.maxNewTokens must not exceed limits.maxNewTokens")


@dataclass(frozen=True)
class GatewayConfig:
    namespace: str = "default"
    models: list[str] = field(default_factory=list)
    """Models served even when the registry in Redis does not list them."""
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    max_tokens: int = 4096
    """Gateway-wide ceiling on max_tokens, on top of each model's own limit."""
    max_concurrency: int = 512
    request_timeout_seconds: float = 60.0
    result_ttl_seconds: int = 3600
    publish_connections: int = 4
    """AMQP connections publishing requests; each waits for one confirm at a time, so several let
    simultaneous requests reach the queue within a worker's batching wait."""
    auth_token_file: str | None = None
    """File holding the bearer token clients must send (a mounted Secret); no auth when unset."""
    access_log: bool = True
    """A line per /v1/ request (client, method, path, status, milliseconds); off for benchmarks."""

    def __post_init__(self) -> None:
        if not 1 <= self.publish_connections <= 64:
            raise SettingsError("publishConnections must be between 1 and 64")
