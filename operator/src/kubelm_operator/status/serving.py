"""A LanguageModel's status from what was observed: its model source, queue, Redis entry and workers.

Pure, like the TrainingJob's: the same observations give the same status (timestamps included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .conditions import READY, RECONCILING, STALLED, condition
from .observed import ObservedPod

PENDING, LOADING, READY_PHASE, DEGRADED, SUSPENDED, FAILED = \
    "Pending", "Loading", "Ready", "Degraded", "Suspended", "Failed"
QUEUE_READY, CACHE_READY, MODEL_READY = "QueueReady", "CacheReady", "ModelReady"
HISTORY_LIMIT = 10
REVISIONS_LIMIT = 5


@dataclass(frozen=True)
class Problem:
    """Something that keeps one part from working. `stalled`: a person must act."""

    reason: str
    message: str
    stalled: bool = True
    degrades: bool = False
    """A stalled problem that leaves the model served in part (phase Degraded rather than Failed)."""
    warning: bool = False
    """The part works, with a caveat worth saying (in its condition): the phase is not affected."""


@dataclass(frozen=True)
class ObservedDeployment:
    name: str
    replicas: int | None
    """What the Deployment asks for (spec.replicas)."""
    ready: int = 0
    updated: int = 0
    available: int = 0
    current: int | None = None
    """Pods of every revision (status.replicas); None when not known."""
    observed_generation: int = 0
    """The generation the Deployment controller last acted on."""
    applied_generation: int = 0
    """The generation the operator's last apply of the pod template produced (0: not known)."""

    @property
    def rolling_out(self) -> bool:
        """Pods of an older template may still answer: the controller has not acted on the newest apply,
        or pods of another revision remain."""
        return self.observed_generation < self.applied_generation or \
            (self.current is not None and self.current > self.updated)

    @classmethod
    def from_body(cls, body: Any) -> ObservedDeployment:
        spec, status = body.get("spec") or {}, body.get("status") or {}
        current = status.get("replicas")
        return cls(str(body["metadata"]["name"]), spec.get("replicas"), int(status.get("readyReplicas") or 0),
                   int(status.get("updatedReplicas") or 0), int(status.get("availableReplicas") or 0),
                   int(current) if current is not None else 0, int(status.get("observedGeneration") or 0))


@dataclass(frozen=True)
class ModelInfo:
    source: str
    revision: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class ServingObservation:
    generation: int
    suspend: bool
    min_replicas: int
    queue_name: str
    endpoint: str | None
    model: ModelInfo | None = None
    model_problem: Problem | None = None
    queue_problem: Problem | None = None
    cache_problem: Problem | None = None
    scaling_problem: Problem | None = None
    workers: ObservedDeployment | None = None
    worker_pods: Sequence[ObservedPod] = ()
    queue: dict[str, float] | None = None
    """name, depth, ready, unacked, consumers, deadLettered, from the management API."""
    cache: dict[str, int] | None = None
    scaling: Sequence[dict[str, Any]] = field(default_factory=tuple)
    """New scaling decisions to append to the history: {time, from, to, reason}."""
    gateway: ObservedDeployment | None = None
    """The gateway Deployment as last seen, when the spec asks for a gateway (`endpoint` is set)."""
    gateway_problem: Problem | None = None
    """Why the gateway's pods cannot start (a missing Secret), said instead of only waiting for them."""


def _part(type_: str, problem: Problem | None, ok_reason: str, ok_message: str, generation: int,
          previous: list[dict[str, Any]], at: str) -> dict[str, Any]:
    if problem is not None and problem.warning:
        return condition(type_, True, problem.reason, problem.message, generation, previous, at)
    if problem is None:
        return condition(type_, True, ok_reason, ok_message, generation, previous, at)
    return condition(type_, False, problem.reason, problem.message, generation, previous, at)


def cache_backend_problem(enabled: bool, backend: str, memcached_configured: bool) -> Problem | None:
    """A response cache asked to live in Memcached with no Memcached to use: the model serves without it."""
    if enabled and backend == "memcached" and not memcached_configured:
        return Problem("MemcachedNotConfigured", "spec.cache.responses.backend is memcached but the operator has "
                       "no KUBELM_MEMCACHED_URL (kubelm-connections Secret): serving without the response cache",
                       degrades=True)
    return None


LOAD_FAILURE_EXIT_CODE = 1


def load_failure(pods: Sequence[ObservedPod]) -> Problem | None:
    """A worker that exited because its model cannot load (the runtime's one-line reason, its termination
    message), keeps failing to start, or cannot be placed on any node."""
    for pod in pods:
        ended = pod.terminated
        if ended is not None and ended.exit_code == LOAD_FAILURE_EXIT_CODE and ended.message.startswith("model "):
            return Problem("ModelLoadFailed", f"pod {pod.name}: {ended.message.strip()}", degrades=True)
    for pod in pods:
        if pod.waiting is not None:
            return Problem(pod.waiting[0], f"pod {pod.name}: {pod.waiting[0]}: {pod.waiting[1]}".rstrip(": "),
                           degrades=True)
    # Said as the TrainingJob says it, so that a worker asking for GPUs no node offers is not "Loading" forever.
    for pod in pods:
        if pod.unschedulable:
            return Problem("Unschedulable", f"pod {pod.name} cannot be scheduled: {pod.unschedulable}", degrades=True)
    return None


def compute(old: dict[str, Any], obs: ServingObservation, at: str) -> dict[str, Any]:
    previous = old.get("conditions") or []
    if (obs.model_problem is None or obs.model_problem.warning) and \
            (failing := load_failure(obs.worker_pods)) is not None:
        obs = replace(obs, model_problem=failing)
    workers = obs.workers
    desired = 0 if obs.suspend else (workers.replicas if workers and workers.replicas is not None
                                     else obs.min_replicas)
    ready = workers.ready if workers else 0
    problems = [p for p in (obs.model_problem, obs.queue_problem, obs.cache_problem, obs.scaling_problem,
                            obs.gateway_problem) if p is not None and not p.warning]
    stalled = next((p for p in problems if p.stalled), None)
    if obs.suspend:
        phase, reason, message = SUSPENDED, "Suspended", "spec.suspend is true: no workers run; the queue is kept"
    elif stalled is not None:
        failed = obs.model_problem is stalled and not stalled.degrades
        phase, reason, message = (FAILED if failed else DEGRADED), stalled.reason, stalled.message
    elif problems:
        phase, reason, message = PENDING, problems[0].reason, problems[0].message
    elif workers is None:
        phase, reason, message = PENDING, "Creating", "creating the workers"
    elif workers.rolling_out:
        phase, reason, message = LOADING, "RollingOut", \
            f"rolling out the workers' new revision ({workers.updated}/{desired} updated, {ready} ready)"
    elif desired == 0:
        phase, reason, message = READY_PHASE, "ScaledToZero", "no backlog: no workers run until requests arrive"
    elif ready == 0:
        phase, reason, message = LOADING, "Loading", f"waiting for a worker to load the model (0/{desired} ready)"
    elif ready < desired:
        phase, reason, message = DEGRADED, "WorkersNotReady", f"{ready}/{desired} workers ready"
    else:
        phase, reason, message = READY_PHASE, "WorkersReady", f"{ready}/{desired} workers ready"
    if phase == READY_PHASE and obs.endpoint and (obs.gateway is None or obs.gateway.ready == 0):
        # Ready says requests to the endpoint are answered: not before the gateway behind it is.
        wanted = obs.gateway.replicas if obs.gateway is not None and obs.gateway.replicas is not None else 1
        phase, reason, message = LOADING, "GatewayNotReady", f"waiting for the gateway (0/{wanted} ready); {message}"
    elif phase == READY_PHASE and obs.endpoint and obs.gateway is not None and obs.gateway.rolling_out:
        phase, reason, message = LOADING, "GatewayRollingOut", \
            f"rolling out the gateway's new revision ({obs.gateway.updated} updated, {obs.gateway.ready} ready)"

    status: dict[str, Any] = {"phase": phase, "observedGeneration": obs.generation,
                              "replicas": workers.available if workers else 0, "readyReplicas": ready,
                              "desiredReplicas": desired}
    queue = dict(old.get("queue") or {"name": obs.queue_name})
    if obs.queue is not None:
        queue = {"name": obs.queue_name, **obs.queue}
    status["queue"] = queue
    revisions = list(old.get("revisions") or [])
    if obs.model is not None:
        status["model"] = {k: v for k, v in (("source", obs.model.source), ("revision", obs.model.revision),
                                             ("digest", obs.model.digest)) if v}
        before = old.get("model")
        if before and (before.get("source"), before.get("digest")) != (obs.model.source, obs.model.digest):
            revisions.append({**before, "until": at})
    elif "model" in old:
        status["model"] = old["model"]
    if revisions:
        status["revisions"] = revisions[-REVISIONS_LIMIT:]
    if obs.endpoint:
        status["endpoint"] = obs.endpoint
    cache = obs.cache if obs.cache is not None else old.get("cache")
    if cache:
        status["cache"] = {"hits": int(cache.get("hits", 0)), "misses": int(cache.get("misses", 0))}
    history = list(old.get("scalingHistory") or []) + list(obs.scaling)
    if history:
        status["scalingHistory"] = history[-HISTORY_LIMIT:]
        status["lastScaleTime"] = history[-1]["time"]

    is_ready = phase == READY_PHASE
    in_progress = phase in (PENDING, LOADING) and stalled is None
    g = obs.generation
    status["conditions"] = [
        condition(READY, is_ready, reason, message, g, previous, at),
        condition(RECONCILING, in_progress, reason if in_progress else phase,
                  message if in_progress else f"phase {phase}", g, previous, at),
        condition(STALLED, stalled is not None, stalled.reason if stalled else phase,
                  stalled.message if stalled else "nothing blocks the model", g, previous, at),
        _part(QUEUE_READY, obs.queue_problem, "Declared", f"queue {obs.queue_name} declared", g, previous, at),
        _part(CACHE_READY, obs.cache_problem, "Registered", "registry entry written", g, previous, at)
        if obs.model is not None or obs.cache_problem is not None else
        condition(CACHE_READY, False, "WaitingForModel", "the registry entry is written once the model resolves", g,
                  previous, at),
        _part(MODEL_READY, obs.model_problem, "Resolved",
              f"serving {obs.model.source}" if obs.model else "model resolved", g, previous, at),
    ]
    return status
