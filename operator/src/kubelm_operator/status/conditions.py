"""Kubernetes-style conditions (kstatus: Ready, Reconciling, Stalled) and the diff that decides a write."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
MESSAGE_LIMIT = 1024


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clip(message: str, limit: int = MESSAGE_LIMIT) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def condition(type_: str, status: bool, reason: str, message: str, generation: int,
              previous: Iterable[dict[str, Any]], at: str) -> dict[str, Any]:
    """A condition whose lastTransitionTime moves only when its status does."""
    value = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before["lastTransitionTime"] if before and before.get("status") == value and \
        before.get("lastTransitionTime") else at
    return {"type": type_, "status": value, "reason": reason, "message": clip(message),
            "lastTransitionTime": since, "observedGeneration": generation}


def find(conditions: Iterable[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


@dataclass(frozen=True)
class Transition:
    """An Event to post."""

    type: str  # Normal or Warning
    reason: str
    message: str


def phase_transitions(old: dict[str, Any], new: dict[str, Any], warning_phases: tuple[str, ...]) -> list[Transition]:
    """The Events a status change deserves: a new phase, and a new reason to be stalled."""
    events = []
    stalled_now = find(new.get("conditions") or [], STALLED) or {}
    if old.get("phase") != new.get("phase"):
        phase = new.get("phase")
        ready = find(new.get("conditions") or [], READY) or {}
        warning = phase in warning_phases
        message = stalled_now.get("message") if warning and stalled_now.get("status") == "True" \
            else ready.get("message")
        events.append(Transition("Warning" if warning else "Normal", str(phase),
                                 clip(f"{old.get('phase') or 'New'} -> {phase}: {message}")))
    before = find(old.get("conditions") or [], STALLED) or {}
    if stalled_now.get("status") == "True" and new.get("phase") not in warning_phases and (
            before.get("status") != "True" or before.get("reason") != stalled_now.get("reason")):
        events.append(Transition("Warning", str(stalled_now.get("reason")), str(stalled_now.get("message"))))
    return events
