"""What every handler shares: settings, the API and Redis clients, per-object locks, written statuses."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .broker import Broker
from .builders.common import GROUP
from .cache import Cache
from .config import OperatorConfig
from .kube import Kube
from .persistence import HandledSpecs


@dataclass
class Context:
    config: OperatorConfig
    kube: Kube
    cache: Cache
    broker: Broker
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    """One reconciliation at a time per object, whatever triggered it."""
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    """object uid -> the status last written, newer than a watch event may yet show."""
    clock: Callable[[], float] = time.monotonic
    handled: HandledSpecs = field(default_factory=lambda: HandledSpecs(GROUP))
    """kopf's diff base: the spec each object was last handled with."""
    """The autoscaler's time (seconds, any origin)."""

    @classmethod
    def create(cls, config: OperatorConfig) -> Context:
        return cls(config, Kube(timeout=config.request_timeout_seconds), Cache(config.redis_url),
                   Broker(config.amqp_url, config.rabbitmq_api_url))

    def forget(self, key: str, uid: str) -> None:
        self.locks.pop(key, None)
        self.written.pop(uid, None)
        self.handled.forget(uid)

    async def close(self) -> None:
        await self.kube.close()
        await self.cache.close()
        await self.broker.close()
