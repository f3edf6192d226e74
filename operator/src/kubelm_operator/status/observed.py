"""The few facts about Jobs and Pods that status needs, taken from their bodies once.

Kept small on purpose: the operator holds one of these per child in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Reasons a container waits that a person must fix; the others (ContainerCreating, ...) pass by themselves.
STUCK_WAITING_REASONS = frozenset({
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "CrashLoopBackOff", "RunContainerError",
})


def controller(body: Any) -> tuple[str, str, str] | None:
    """(kind, name, uid) of the object's controller: the owner reference with controller: true."""
    refs = (body.get("metadata") or {}).get("ownerReferences") or ()
    return next(((str(r.get("kind")), str(r.get("name")), str(r.get("uid"))) for r in refs if r.get("controller")),
                None)


def controller_uid(body: Any) -> str | None:
    found = controller(body)
    return found[2] if found else None


@dataclass(frozen=True)
class JobCondition:
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str | None


@dataclass(frozen=True)
class ObservedJob:
    name: str
    suspended: bool
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    conditions: tuple[JobCondition, ...] = ()
    uid: str = ""
    owner_uid: str | None = None
    """The controller's uid: a Job of an earlier TrainingJob of the same name has another."""
    owner_name: str | None = None
    terminating: bool = False

    def condition(self, type_: str) -> JobCondition | None:
        return next((c for c in self.conditions if c.type == type_ and c.status == "True"), None)

    @classmethod
    def from_body(cls, body: Any) -> ObservedJob:
        status = body.get("status") or {}
        return cls(
            name=str(body["metadata"]["name"]),
            suspended=bool((body.get("spec") or {}).get("suspend")),
            active=int(status.get("active") or 0),
            ready=int(status.get("ready") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed=int(status.get("failed") or 0),
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            conditions=tuple(
                JobCondition(str(c.get("type")), str(c.get("status")), str(c.get("reason") or ""),
                             str(c.get("message") or ""), c.get("lastTransitionTime"))
                for c in status.get("conditions") or ()),
            uid=str(body["metadata"].get("uid") or ""),
            owner_uid=controller_uid(body),
            owner_name=(controller(body) or ("", None, ""))[1],
            terminating=bool(body["metadata"].get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class Termination:
    reason: str
    exit_code: int
    message: str


@dataclass(frozen=True)
class ObservedPod:
    name: str
    phase: str
    created: str = ""
    unschedulable: str | None = None
    """The scheduler's message while the pod cannot be placed."""
    waiting: tuple[str, str] | None = None
    """(reason, message) of a container stuck waiting."""
    terminated: Termination | None = None
    """How the trainer container ended, when it failed."""
    owner_uid: str | None = None
    """The uid of the Job (or ReplicaSet) that made the pod."""

    @classmethod
    def from_body(cls, body: Any) -> ObservedPod:
        meta, status = body["metadata"], body.get("status") or {}
        unschedulable = next((str(c.get("message") or c.get("reason"))
                              for c in status.get("conditions") or ()
                              if c.get("type") == "PodScheduled" and c.get("status") == "False"
                              and c.get("reason") == "Unschedulable"), None)
        waiting = terminated = None
        for container in status.get("containerStatuses") or ():
            state = container.get("state") or {}
            if "waiting" in state and (state["waiting"] or {}).get("reason") in STUCK_WAITING_REASONS:
                waiting = (str(state["waiting"]["reason"]), str(state["waiting"].get("message") or ""))
            # A container that restarts (a Deployment's) keeps how it last ended in lastState.
            for ended in (state.get("terminated"), (container.get("lastState") or {}).get("terminated")):
                if ended and ended.get("exitCode", 0) != 0 and terminated is None:
                    terminated = Termination(str(ended.get("reason") or "Error"), int(ended.get("exitCode") or 0),
                                             str(ended.get("message") or ""))
        return cls(str(meta["name"]), str(status.get("phase") or "Pending"), str(meta.get("creationTimestamp") or ""),
                   unschedulable, waiting, terminated, controller_uid(body))
