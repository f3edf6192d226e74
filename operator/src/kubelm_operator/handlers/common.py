"""What the handlers of both kinds do the same way: write a status that changed, post Events."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any, cast

import kopf

from .. import metrics
from ..builders.common import API_VERSION, Owner
from ..context import Context
from ..status import conditions
from ..status.conditions import Transition

SKIP_CLEANUP_ANNOTATION = "kubelm.io/skip-cleanup"
"""Set to "true" on an object being deleted: its finalizer leaves queues and Redis keys as they are and goes."""


def snapshot(body: Any, kind: str) -> dict[str, Any]:
    """A plain copy of what reconciling a custom resource needs, taken from kopf's body once."""
    meta = body["metadata"]
    annotations = meta.get("annotations") or {}
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "generation": meta.get("generation", 1), "deletionTimestamp": meta.get("deletionTimestamp"),
                         "resourceVersion": meta.get("resourceVersion"),
                         "annotations": {k: v for k, v in annotations.items() if k == SKIP_CLEANUP_ANNOTATION}},
            "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}


def cleanup_given_up(ctx: Context, body: dict[str, Any], now: datetime.datetime | None = None) -> str | None:
    """Why the finalizer should stop trying and let the object go, or None: a person asked for it (the
    annotation), or external state could not be cleaned for the configured time since the deletion."""
    meta = body["metadata"]
    if str((meta.get("annotations") or {}).get(SKIP_CLEANUP_ANNOTATION, "")).lower() == "true":
        return f"the {SKIP_CLEANUP_ANNOTATION} annotation is set"
    deleted, limit = meta.get("deletionTimestamp"), ctx.config.cleanup_timeout_seconds
    if not deleted or not limit:
        return None
    since = datetime.datetime.fromisoformat(str(deleted).replace("Z", "+00:00"))
    elapsed = ((now or datetime.datetime.now(datetime.UTC)) - since).total_seconds()
    return f"cleanup did not finish within {limit:g}s of the deletion" if elapsed >= limit else None


async def write_status(ctx: Context, owner: Owner, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any],
                       events: Iterable[Transition]) -> bool:
    """Server-side applies `new` when it differs from `old`, then posts `events`; False when nothing changed."""
    if new == old:
        return False
    answer = await ctx.kube.apply({"apiVersion": API_VERSION, "kind": owner.kind,
                                   "metadata": {"name": owner.name, "namespace": owner.namespace}, "status": new},
                                  subresource="status")
    metrics.STATUS_WRITES.labels(owner.kind).inc()
    ctx.wrote_status(body, new, ((answer or {}).get("metadata") or {}).get("resourceVersion"))
    for event in events:
        kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)
    return True


async def cleanup_failed(ctx: Context, owner: Owner, body: dict[str, Any], retry: int, error: Exception,
                         what: str) -> kopf.TemporaryError:
    """Reports a finalizer that cannot finish yet (a Stalled condition and a Warning Event, the rest of the
    status kept) and returns the error that makes kopf retry it with backoff."""
    delay = min(60, 2 ** min(retry, 6))
    message = (f"cannot remove {what} yet, retrying in {delay}s ({error}); if the operator is gone for good, "
               f"remove the finalizer by hand (docs/operator.md)")
    old = ctx.status_base(body)
    stalled = conditions.condition(conditions.STALLED, True, "CleanupFailed", message,
                                   int(body["metadata"].get("generation") or 1), [], conditions.now())
    # The whole status goes with it: an apply that left fields out would remove them.
    new = {**old, "conditions": [c for c in old.get("conditions") or [] if c.get("type") != conditions.STALLED]
           + [stalled]}
    await write_status(ctx, owner, body, old, new, [Transition("Warning", "CleanupFailed", message)])
    return kopf.TemporaryError(message, delay=delay)
