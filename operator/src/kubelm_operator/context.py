"""What every handler shares: settings, the API and Redis clients, per-object locks, written statuses."""

from __future__ import annotations

import asyncio
import time
import zlib
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


@dataclass(frozen=True)
class WrittenStatus:
    status: dict[str, Any]
    version: str | None
    """The resourceVersion the write produced."""
    older: tuple[str, ...]
    """resourceVersions of the object known to come before this write."""


@dataclass
class Context:
    config: OperatorConfig
    kube: Kube
    cache: Cache
    broker: Broker
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    """One reconciliation at a time per object, whatever triggered it."""
    written: dict[str, WrittenStatus] = field(default_factory=dict)
    """object uid -> the status last written, newer than a watch event may yet show."""
    clock: Callable[[], float] = time.monotonic
    """The autoscaler's and the timers' time (seconds, any origin)."""
    handled: HandledSpecs = field(default_factory=lambda: HandledSpecs(GROUP))
    """kopf's diff base: the spec each object was last handled with."""
    reconciled: dict[str, float] = field(default_factory=dict)
    """object uid -> when (`clock`) a reconciliation of it last finished."""

    @classmethod
    def create(cls, config: OperatorConfig) -> Context:
        return cls(config, Kube(timeout=config.request_timeout_seconds), Cache(config.redis_url),
                   Broker(config.amqp_url, config.rabbitmq_api_url))

    def tick_due(self, uid: str, interval: float) -> bool:
        """Whether a timer's tick should reconcile: timers are the safety net for what no event brings, so
        a tick within half an interval of another trigger's reconciliation adds nothing (at most 1.5
        intervals pass without one). At a few hundred new objects the ticks otherwise doubled the work."""
        last = self.reconciled.get(uid)
        return last is None or self.clock() - last >= interval / 2

    def status_base(self, body: dict[str, Any]) -> dict[str, Any]:
        """The status to compute the next one from: the one this process last wrote while `body` is a
        version from before that write (the watch lags behind), else the body's own (it shows that write or
        something newer: another writer, or changes made while this process was not acting)."""
        written = self.written.get(str(body["metadata"]["uid"]))
        if written is not None and body["metadata"].get("resourceVersion") in written.older:
            return written.status
        return dict(body.get("status") or {})

    def wrote_status(self, body: dict[str, Any], status: dict[str, Any], written_version: str | None) -> None:
        before = self.written.get(str(body["metadata"]["uid"]))
        older = (*before.older, before.version) if before is not None else ()
        older = (*older, body["metadata"].get("resourceVersion"))
        known = tuple(dict.fromkeys(v for v in older if v and v != written_version))
        # A handful is enough: the watch is never that many of our own writes behind.
        self.written[str(body["metadata"]["uid"])] = WrittenStatus(status, written_version, known[-16:])

    def resync_seconds(self, uid: str) -> float:
        """How long applied children go without being applied again (drift repair), spread over
        0.8-1.2 times the setting by the object's uid so that hundreds of objects do not resync at once."""
        spread = zlib.crc32(uid.encode()) / 0xFFFFFFFF
        return self.config.resync_seconds * (0.8 + 0.4 * spread)

    def gone(self, uid: str) -> None:
        """The object was deleted (seen by the watch): drop what was kept about it by uid."""
        self.handled.forget(uid)
        self.reconciled.pop(uid, None)

    def forget(self, key: str, uid: str) -> None:
        """The finalizer finished: drop everything kept about the object."""
        self.locks.pop(key, None)
        self.written.pop(uid, None)
        self.gone(uid)

    async def close(self) -> None:
        await self.kube.close()
        await self.cache.close()
        await self.broker.close()
