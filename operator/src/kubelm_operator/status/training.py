"""A TrainingJob's status from what was observed: its Job, the Job's pods, the trainer's progress.

Pure: the same observations always give the same status, so a restarted operator
writes nothing new, and `transitions` says which Events a change deserves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kubelm_contract.volumes import DEFAULT_VOLUMES_ROOT

from .conditions import READY, RECONCILING, STALLED, Transition, condition, phase_transitions
from .observed import ObservedJob, ObservedPod

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
FINISHED = (SUCCEEDED, FAILED)
PROGRESS_FIELDS = {"step": int, "totalSteps": int, "epoch": float, "loss": float, "evalLoss": float,
                   "tokensPerSecond": float, "percent": float, "etaSeconds": int}


@dataclass(frozen=True)
class Blocker:
    """Why the workers cannot start yet. `stalled`: a person must act; otherwise it resolves by itself."""

    reason: str
    message: str
    stalled: bool


@dataclass(frozen=True)
class Observation:
    generation: int
    suspend: bool
    workers: int
    job: ObservedJob | None = None
    pods: Sequence[ObservedPod] = ()
    progress: dict[str, Any] | None = None
    """The trainer's progress document from Redis, when it could be read."""
    blocker: Blocker | None = None
    checkpoints_kept: bool = True
    """Whether checkpoints outlive the pods (a claim), so that a suspended job resumes where it was."""
    uid: str | None = None
    """The TrainingJob's metadata.uid: progress stamped by another incarnation of the name is ignored."""


def own_progress(document: dict[str, Any] | None, uid: str | None) -> dict[str, Any] | None:
    """`document`, unless a different incarnation (an earlier object of the same name) wrote it.

    The progress key is named by namespace/name and outlives its job (a TTL of days, or a finalizer that
    could not reach Redis): a stale "Succeeded" with an artifact must not become a new job's status.
    An unstamped document is kept: trainers started before incarnations existed report without one.
    """
    if document is None or uid is None:
        return document
    found = document.get("incarnation")
    return document if found is None or found == uid else None


def _progress(document: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, cast in PROGRESS_FIELDS.items():
        value = document.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = cast(round(value) if cast is int else value)
    return out


def artifact_uri(uri: str) -> str:
    """A model left on a mounted claim is reported as pvc://<claim>/<path>, which a LanguageModel can serve."""
    prefix = DEFAULT_VOLUMES_ROOT.rstrip("/") + "/"
    return "pvc://" + uri[len(prefix):] if uri.startswith(prefix) else uri


def _artifact(document: dict[str, Any]) -> dict[str, Any] | None:
    found = document.get("artifact")
    if not isinstance(found, dict) or not isinstance(found.get("uri"), str):
        return None
    artifact: dict[str, Any] = {"uri": artifact_uri(found["uri"])}
    if isinstance(found.get("version"), int):
        artifact["version"] = found["version"]
    if isinstance(found.get("digest"), str):
        artifact["digest"] = found["digest"]
    metrics = {k: float(v) for k, v in (found.get("metrics") or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if metrics:
        artifact["metrics"] = metrics
    return artifact


def _last_lines(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def failure_details(pods: Sequence[ObservedPod], progress: dict[str, Any] | None) -> str:
    """What the newest failed pod and the trainer said, for a person reading `kubectl describe`."""
    parts = []
    failed = [p for p in pods if p.terminated is not None]
    if failed:
        pod = max(failed, key=lambda p: (p.created, p.name))
        assert pod.terminated is not None
        detail = f"pod {pod.name}: {pod.terminated.reason} (exit code {pod.terminated.exit_code})"
        if pod.terminated.message:
            detail += f": {_last_lines(pod.terminated.message)}"
        parts.append(detail)
    if progress and progress.get("phase") == FAILED and progress.get("message"):
        parts.append(f"trainer: {progress['message']}")
    return "; ".join(parts)


def _attempts(job: ObservedJob, workers: int) -> int | None:
    started = job.active + job.succeeded + job.failed
    return math.ceil(started / workers) if started else None


def _phase(obs: Observation) -> tuple[str, str, str, bool]:
    """(phase, reason, message, stalled) of a job whose children exist."""
    job = obs.job
    assert job is not None
    if (done := job.condition("Complete")) is not None:
        return SUCCEEDED, "Succeeded", done.message or "training finished", False
    if (failed := job.condition("Failed")) is not None:
        message = f"{failed.reason}: {failed.message}".strip(": ")
        details = failure_details(obs.pods, obs.progress)
        return FAILED, failed.reason or "JobFailed", f"{message}; {details}" if details else message, True
    if obs.suspend and job.suspended:
        kept = "checkpoints are kept" if obs.checkpoints_kept else \
            "storage is ephemeral, so the job starts over when resumed (storage.type pvc keeps checkpoints)"
        return SUSPENDED, "Suspended", f"spec.suspend is true: no workers run; {kept}", False
    for pod in obs.pods:
        if pod.unschedulable:
            return PENDING, "Unschedulable", f"pod {pod.name} cannot be scheduled: {pod.unschedulable}", True
        if pod.waiting:
            return PENDING, pod.waiting[0], f"pod {pod.name}: {pod.waiting[0]}: {pod.waiting[1]}".rstrip(": "), True
    running = any(p.phase == "Running" for p in obs.pods)
    if job.failed:
        details = failure_details(obs.pods, None)
        return (RUNNING if running else PENDING), "Retrying", \
            f"{job.failed} worker pod(s) failed, retrying" + (f"; last: {details}" if details else ""), False
    if running:
        return RUNNING, "Running", f"{obs.workers} worker(s) training", False
    if job.succeeded or any(p.phase == "Succeeded" for p in obs.pods):
        # Between the last worker's exit and the Job's Complete condition (the Job's own count of
        # succeeded pods may lag the pod): still running, not back to Pending (a phase going
        # Running -> Pending -> Succeeded would misinform whoever watches it).
        return RUNNING, "Finishing", "the workers finished; the Job is completing", False
    return PENDING, "WaitingForPods", "waiting for the worker pods to start", False


def compute(old: dict[str, Any], obs: Observation, at: str) -> dict[str, Any]:
    """The whole status; equal to `old` when nothing changed (timestamps included)."""
    obs = replace(obs, progress=own_progress(obs.progress, obs.uid))
    previous = old.get("conditions") or []
    phase_before = old.get("phase")
    if obs.job is None and phase_before in FINISHED and obs.blocker is None:
        # The Job was removed after finishing (ttlSecondsAfterFinished): the record stays as it was.
        return {**old, "observedGeneration": obs.generation}

    if obs.blocker is not None:
        phase = SUSPENDED if obs.suspend and not obs.blocker.stalled else PENDING
        reason, message, stalled = obs.blocker.reason, obs.blocker.message, obs.blocker.stalled
    elif obs.job is None:
        phase, reason, message, stalled = (SUSPENDED if obs.suspend else PENDING), "Creating", \
            "creating the training Job", False
    else:
        phase, reason, message, stalled = _phase(obs)

    status: dict[str, Any] = {"phase": phase, "observedGeneration": obs.generation}
    progress = dict(old.get("progress") or {})
    if obs.progress:
        progress.update(_progress(obs.progress))
    artifact = old.get("artifact")
    if phase == SUCCEEDED:
        progress.update(percent=100.0, etaSeconds=0)
        if obs.progress and (found := _artifact(obs.progress)):
            artifact = found
    if progress:
        status["progress"] = progress
    if artifact:
        status["artifact"] = artifact
    if obs.job is not None:
        if obs.job.start_time:
            status["startTime"] = obs.job.start_time
        finished = obs.job.completion_time or next(
            (c.last_transition_time for c in obs.job.conditions if c.type == "Failed" and c.status == "True"), None)
        if finished and phase in FINISHED:
            status["completionTime"] = finished
        if (attempts := _attempts(obs.job, obs.workers)) is not None:
            status["attempts"] = attempts
    else:
        for kept in ("startTime", "completionTime", "attempts"):
            if kept in old:
                status[kept] = old[kept]

    ready = phase == SUCCEEDED and artifact is not None
    if ready:
        ready_reason, ready_message = "ArtifactPublished", f"model published as {artifact['uri']}"  # type: ignore[index]
    elif phase == SUCCEEDED:
        ready_reason, ready_message = "ArtifactUnknown", \
            "training finished but the trainer's artifact report could not be read from Redis"
    else:
        ready_reason, ready_message = reason, message
    in_progress = phase in (PENDING, RUNNING) and not stalled
    status["conditions"] = [
        condition(READY, ready, ready_reason, ready_message, obs.generation, previous, at),
        condition(RECONCILING, in_progress, reason if in_progress else phase,
                  message if in_progress else f"phase {phase}", obs.generation, previous, at),
        condition(STALLED, stalled, reason if stalled else phase, message if stalled else "nothing blocks the job",
                  obs.generation, previous, at),
    ]
    return status


def transitions(old: dict[str, Any], new: dict[str, Any]) -> list[Transition]:
    """The Events a status change deserves: a new phase, and a new reason to be stalled."""
    return phase_transitions(old, new, warning_phases=(FAILED,))
