"""What the handlers of both kinds do the same way: write a status that changed, post Events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import kopf

from .. import metrics
from ..builders.common import API_VERSION, Owner
from ..context import Context
from ..status.conditions import Transition


def post(body: dict[str, Any], event: Transition) -> None:
    kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)


async def write_status(ctx: Context, owner: Owner, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any],
                       events: Iterable[Transition]) -> bool:
    """Server-side applies `new` when it differs from `old`, then posts `events`; False when nothing changed."""
    if new == old:
        return False
    await ctx.kube.apply({"apiVersion": API_VERSION, "kind": owner.kind,
                          "metadata": {"name": owner.name, "namespace": owner.namespace}, "status": new},
                         subresource="status")
    metrics.STATUS_WRITES.labels(owner.kind).inc()
    ctx.written[owner.uid] = new
    for event in events:
        post(body, event)
    return True
