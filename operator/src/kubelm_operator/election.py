"""Holding the operator's Lease: waits as standby, renews as leader, releases on a graceful stop.

The decisions are `leader`'s; this module only reads and writes the Lease through `Kube` and keeps time.
Time is the monotonic clock shown as UTC (anchored once at start), so a wall-clock step on this machine
can neither stretch nor shorten a lease; the timestamps written stay close to the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from . import leader
from .kube import ApiError, Kube

log = logging.getLogger(__name__)

_WALL_AT_START = dt.datetime.now(dt.UTC)
_MONOTONIC_AT_START = time.monotonic()


def steady_utc() -> dt.datetime:
    return _WALL_AT_START + dt.timedelta(seconds=time.monotonic() - _MONOTONIC_AT_START)


class LeaseLost(Exception):
    """This process held the Lease and no longer may act."""


class Elector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, lease_duration: int,
                 retry_every: float, clock: Callable[[], dt.datetime] = steady_utc):
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.retry_every = lease_duration, retry_every
        self.clock = clock
        self.leading = False
        self._seen: leader.LeaseRecord | None = None
        self._seen_since = clock()
        self._last_renewed: dt.datetime | None = None

    def report(self) -> dict[str, Any]:
        """What the health endpoint shows: a standby is alive too, only not acting."""
        return {"leaderElection": {"role": "leader" if self.leading else "standby", "identity": self.identity,
                                   "holder": self._seen.holder if self._seen else None,
                                   "lease": f"{self.namespace}/{self.name}"}}

    async def _read(self) -> dict[str, Any] | None:
        found = await self.kube.get(leader.API_VERSION, leader.KIND, self.namespace, self.name)
        record = None if found is None else leader.record_of(found)
        if record != self._seen:
            self._seen, self._seen_since = record, self.clock()
        return found

    async def _try(self) -> bool:
        """One round: read the Lease, decide, write; whether this process holds it afterwards."""
        found = await self._read()
        now = self.clock()
        decision = leader.decide(self._seen, self._seen_since, self.identity, now, self.lease_duration)
        if decision.record is None:
            return False
        if self.leading and decision.action is not leader.Action.RENEW:
            return False  # someone else wrote itself in; `hold` tells why
        try:
            if found is None:
                written = await self.kube.create(leader.lease(self.name, self.namespace, decision.record))
                if written is None:  # another process created it first
                    return False
            else:
                written = await self.kube.replace(leader.lease(self.name, self.namespace, decision.record,
                                                               found["metadata"]["resourceVersion"]))
        except ApiError as e:
            if e.conflict:  # written by another process since it was read: read again next round
                return False
            raise
        self._seen, self._seen_since, self._last_renewed = leader.record_of(written), now, now
        if decision.action is not leader.Action.RENEW or not self.leading:
            log.info("Leader election: %s holds Lease %s/%s (%s, transitions %d).", self.identity,
                     self.namespace, self.name, decision.action.value, decision.record.transitions)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Waits as standby until this process holds the Lease (True) or `stop` is set (False)."""
        announced: str | None = None
        while not stop.is_set():
            try:
                if await self._try():
                    self.leading = True
                    return True
            except Exception as e:  # whatever the request met, the next round tries again
                log.warning("Leader election: reading or writing Lease %s/%s failed: %s", self.namespace,
                            self.name, e)
            holder = self._seen.holder if self._seen else ""
            if holder and holder != announced:
                log.info("Leader election: standby while %s holds Lease %s/%s.", holder, self.namespace, self.name)
                announced = holder
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.retry_every)
        return False

    async def hold(self) -> None:
        """Renews until the Lease is lost, then raises LeaseLost; runs while the operator acts."""
        assert self.leading and self._last_renewed is not None
        while True:
            await asyncio.sleep(self.retry_every)
            deadline = self._last_renewed + dt.timedelta(seconds=leader.renew_deadline(self.lease_duration))
            renewed = False
            try:
                remaining = max((deadline - self.clock()).total_seconds(), 0.0)
                renewed = await asyncio.wait_for(self._try(), timeout=remaining)
            except Exception as e:  # a renewal that failed, for whatever reason: the deadline decides
                log.warning("Leader election: renewing Lease %s/%s failed: %s", self.namespace, self.name, e)
            holder = self._seen.holder if self._seen else ""
            if not renewed and holder != self.identity:
                self.leading = False
                raise LeaseLost(f"Lease {self.namespace}/{self.name} is now held by {holder or 'nobody'}")
            if leader.must_step_down(self._last_renewed, self.clock(), self.lease_duration):
                self.leading = False
                raise LeaseLost(f"Lease {self.namespace}/{self.name} not renewed for "
                                f"{leader.renew_deadline(self.lease_duration):g} s")

    async def release(self) -> None:
        """Writes the Lease free, so that a standby takes over at once instead of waiting for it to expire."""
        if not self.leading:
            return
        self.leading = False
        try:
            found = await self._read()
            if found is None or self._seen is None or self._seen.holder != self.identity:
                return
            await self.kube.replace(leader.lease(self.name, self.namespace, leader.released(self._seen, self.clock()),
                                                 found["metadata"]["resourceVersion"]))
            log.info("Leader election: released Lease %s/%s.", self.namespace, self.name)
        except Exception as e:
            # The standby then takes over when the lease expires instead.
            log.warning("Leader election: releasing Lease %s/%s failed: %s", self.namespace, self.name, e)
