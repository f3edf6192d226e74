"""Which of several operator processes acts: the Lease decision, made the way client-go's leader election makes it.

Pure, with the clock passed in, so the rule is tested without an API server:

- no Lease yet: create it, holding it;
- held by another identity: wait until the holder has not renewed for its lease duration, counted from
  when this process first saw the record as it is (never from the record's own timestamps, which another
  machine's clock wrote);
- released (no holder), expired, or already ours: write ourselves in as holder.

The holder steps down when it has not renewed for two thirds of the lease duration, so it stops acting
before any other process may take over. Writes carry the Lease's resourceVersion: of two processes writing
the same record, one gets a conflict and reads again.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, replace
from typing import Any

API_VERSION = "coordination.k8s.io/v1"
KIND = "Lease"
MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class LeaseRecord:
    """The spec of a coordination.k8s.io/v1 Lease; an empty holder is a released lease."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0


class Action(enum.Enum):
    CREATE = "create"
    """No Lease exists: create it with us as holder."""
    ACQUIRE = "acquire"
    """The Lease is free or expired: replace it with us as holder."""
    RENEW = "renew"
    """We hold it: replace it with a new renew time."""
    WAIT = "wait"
    """Another process holds it."""


@dataclass(frozen=True)
class Decision:
    action: Action
    record: LeaseRecord | None
    """What to write; None when waiting."""
    expires_in: float = 0.0
    """When waiting: seconds until the holder's lease runs out unless it renews."""


def renew_deadline(lease_duration: float) -> float:
    """How long the holder may go without a successful renewal before it stops acting (client-go's
    defaults, 10 s of a 15 s lease; 8 s of the operator's 12 s)."""
    return lease_duration * 2 / 3


def decide(seen: LeaseRecord | None, seen_since: dt.datetime, identity: str, now: dt.datetime,
           lease_duration: int) -> Decision:
    """`seen`: the Lease as last read (None: there is none); `seen_since`: when this process first read it
    exactly so. Returns what to do and the record to write."""
    if seen is None:
        return Decision(Action.CREATE, LeaseRecord(identity, lease_duration, now, now, 0))
    if seen.holder == identity:
        return Decision(Action.RENEW, replace(seen, duration_seconds=lease_duration, renew_time=now,
                                              acquire_time=seen.acquire_time or now))
    expires_in = (seen_since + dt.timedelta(seconds=seen.duration_seconds) - now).total_seconds()
    if seen.holder and expires_in > 0:
        return Decision(Action.WAIT, None, expires_in)
    return Decision(Action.ACQUIRE, LeaseRecord(identity, lease_duration, now, now, seen.transitions + 1))


def must_step_down(last_renewed: dt.datetime, now: dt.datetime, lease_duration: float) -> bool:
    """Whether the holder, whose last successful write was at `last_renewed`, must stop acting now."""
    return (now - last_renewed).total_seconds() >= renew_deadline(lease_duration)


def released(record: LeaseRecord, now: dt.datetime) -> LeaseRecord:
    """What a holder that stops gracefully writes: no holder, and a lease that is over at once even for
    a process that ignores the missing holder (client-go writes the same)."""
    return LeaseRecord("", 1, now, now, record.transitions)


def identity(pod_name: str | None, hostname: str, pid: int) -> str:
    """The pod's name where the Deployment passes it; elsewhere unique per process on a host."""
    return pod_name or f"{hostname}-{pid}"


def _time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    text = str(value)
    for form in (MICROTIME, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, form).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    return None


def _stamp(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime(MICROTIME)


def record_of(lease: dict[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_time(spec.get("acquireTime")),
        renew_time=_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def lease(name: str, namespace: str, record: LeaseRecord, resource_version: str | None = None) -> dict[str, Any]:
    """The Lease object holding `record`; with `resource_version`, a replacement that fails with a conflict
    when someone else wrote it since."""
    spec: dict[str, Any] = {"leaseDurationSeconds": record.duration_seconds, "leaseTransitions": record.transitions}
    if record.holder:
        spec["holderIdentity"] = record.holder
    for key, value in (("acquireTime", record.acquire_time), ("renewTime", record.renew_time)):
        if value is not None:
            spec[key] = _stamp(value)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/part-of": "kubelm"}}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
