"""TrainingJob: children made once the inputs exist, status kept from the Job, its pods and Redis.

Triggers: create/update/resume of the TrainingJob, any event of its Job or pods, and a
timer while it is not finished (Redis progress, waiting for claims or another job).
Every trigger runs the same level-based `reconcile` under the object's lock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any, cast

import kopf

from kubelm_contract.settings import SettingsError

from .. import metrics
from ..builders import training as build
from ..builders.common import GROUP, VERSION, Owner
from ..cache import CacheUnavailable
from ..config import FIELD_MANAGER
from ..context import Context
from ..kube import ApiError
from ..spec import TrainingJobSpec, parse_trainingjob
from ..status import conditions
from ..status import training as status
from ..status.observed import ObservedJob, ObservedPod

log = logging.getLogger(__name__)
KIND = "TrainingJob"
PLURAL = "trainingjobs"
CHILD_LABELS = {"app.kubernetes.io/managed-by": FIELD_MANAGER, "app.kubernetes.io/component": build.COMPONENT}
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def snapshot(body: Any) -> dict[str, Any]:
    """A plain copy of what reconciling needs, kept in the TrainingJob index."""
    meta = body["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "generation": meta.get("generation", 1), "deletionTimestamp": meta.get("deletionTimestamp")},
            "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}


async def _claims_blocker(ctx: Context, namespace: str, spec: TrainingJobSpec) -> status.Blocker | None:
    claims = dict(spec.claims())
    if spec.storage.claim_name:
        claims.setdefault("spec.storage.claimName", spec.storage.claim_name)
    for field_path, claim in claims.items():
        if await ctx.kube.get("v1", "PersistentVolumeClaim", namespace, claim) is None:
            return status.Blocker("ClaimNotFound", f"{field_path}: PersistentVolumeClaim {claim!r} not found in "
                                                   f"namespace {namespace}; create it or fix the field", True)
    return None


def _resolve_reference(owner: Owner, spec: TrainingJobSpec, trainingjobs: kopf.Index) -> tuple[
        str | None, status.Blocker | None]:
    """(artifact uri, None) once the referenced job succeeded with an artifact, else (None, why not)."""
    ref = spec.base_model.training_job_ref
    if ref is None:
        return None, None
    where = "spec.baseModel.trainingJobRef"
    if ref.name == owner.name:
        return None, status.Blocker("InvalidReference", f"{where}: a TrainingJob cannot start from itself", True)
    found = next(iter(trainingjobs.get((owner.namespace, ref.name), ())), None)
    if found is None:
        return None, status.Blocker("TrainingJobNotFound", f"{where}: TrainingJob {ref.name!r} not found in "
                                                           f"namespace {owner.namespace}", True)
    other = found["status"]
    artifact = (other.get("artifact") or {}).get("uri")
    if other.get("phase") == status.FAILED:
        why = (conditions.find(other.get("conditions") or [], conditions.STALLED) or {}).get("message", "")
        return None, status.Blocker("TrainingJobFailed", f"{where}: TrainingJob {ref.name!r} failed: {why}", True)
    if other.get("phase") == status.SUCCEEDED and artifact:
        return str(artifact), None
    return None, status.Blocker("WaitingForTrainingJob", f"{where}: waiting for TrainingJob {ref.name!r} to "
                                                         f"succeed (phase {other.get('phase') or 'Pending'})", False)


def _from_reference(spec: TrainingJobSpec, artifact: str | None) -> tuple[TrainingJobSpec, str | None]:
    """A referenced job that left its model on a claim (no artifact cache) is trained from that path."""
    if artifact is None or artifact.startswith("artifact://"):
        return spec, artifact
    return replace(spec, base_model=replace(spec.base_model, training_job_ref=None, uri=artifact)), None


async def _create_children(ctx: Context, owner: Owner, spec: TrainingJobSpec,
                           artifact: str | None) -> ObservedJob | None:
    """Applies what the pods mount, then creates the Job; returns the Job when this call created it."""
    objects = build.children(owner, spec, image=ctx.config.runtime_image, redis_url=ctx.config.redis_url,
                             artifact_uri=artifact, progress_interval_seconds=ctx.config.progress_interval_seconds)
    *others, job = objects
    await asyncio.gather(*(ctx.kube.apply(obj) for obj in others))
    # The Job's pod template is immutable: create it once; only suspend changes afterwards.
    created = await ctx.kube.create(job)
    return ObservedJob.from_body(created) if created else None


async def reconcile(ctx: Context, body: dict[str, Any], indexes: dict[str, kopf.Index], trigger: str) -> None:
    owner = Owner.of(body)
    with metrics.reconciling(KIND, trigger):
        async with ctx.locks[owner.id]:
            await _reconcile(ctx, owner, body, indexes)


async def _reconcile(ctx: Context, owner: Owner, body: dict[str, Any], indexes: dict[str, kopf.Index]) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return  # going away: the finalizer cleans up, the garbage collector takes the children
    old = ctx.written.get(owner.uid) or dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation") or 1)
    try:
        spec = parse_trainingjob(body.get("spec"))
    except SettingsError as e:
        obs = status.Observation(generation, bool((body.get("spec") or {}).get("suspend")), 1,
                                 blocker=status.Blocker("InvalidSpec", str(e), True))
        await _write_status(ctx, owner, body, old, obs)
        return
    names = build.names(owner)
    job = next(iter(indexes["kubelm_jobs"].get((owner.namespace, names.job), ())), None)
    observed_job: ObservedJob | None = job[1] if job else None
    blocker = None
    if observed_job is None and old.get("phase") not in status.FINISHED:
        artifact, blocker = _resolve_reference(owner, spec, indexes["kubelm_trainingjobs"])
        effective, artifact = _from_reference(spec, artifact)
        blocker = blocker or await _claims_blocker(ctx, owner.namespace, effective)
        if blocker is None:
            try:
                # The watch will bring the Job too; the answer lets this status say Suspended or
                # Pending already instead of writing "Creating" first.
                observed_job = await _create_children(ctx, owner, effective, artifact)
            except ApiError as e:
                if not e.invalid:
                    raise
                blocker = status.Blocker("InvalidChild", f"the API server refused a child object: {e.message}", True)
    elif observed_job is not None and observed_job.suspended != spec.suspend and \
            old.get("phase") not in status.FINISHED:
        await ctx.kube.merge_patch("batch/v1", "Job", owner.namespace, names.job, {"spec": {"suspend": spec.suspend}})
    pods = [pod for _, pod in indexes["kubelm_pods"].get((owner.namespace, names.job), ())]
    progress = await _progress(ctx, owner, old, observed_job)
    obs = status.Observation(generation, spec.suspend, spec.workers, observed_job, pods, progress, blocker)
    await _write_status(ctx, owner, body, old, obs)


async def _progress(ctx: Context, owner: Owner, old: dict[str, Any], job: ObservedJob | None) -> dict[str, Any] | None:
    """The trainer's report, read while workers run and once more when the Job finishes."""
    if job is None:
        return None
    finishing = (job.condition("Complete") or job.condition("Failed")) and old.get("phase") not in status.FINISHED
    missing_artifact = job.condition("Complete") is not None and not old.get("artifact")
    if not (job.active or finishing or missing_artifact):
        return None
    try:
        return await ctx.cache.progress(owner.id)
    except CacheUnavailable as e:
        log.warning("%s: %s; status keeps the last progress", owner.id, e)
        return None


async def _write_status(ctx: Context, owner: Owner, body: dict[str, Any], old: dict[str, Any],
                        obs: status.Observation) -> None:
    new = status.compute(old, obs, conditions.now())
    if new == old:
        return
    await ctx.kube.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                          "metadata": {"name": owner.name, "namespace": owner.namespace}, "status": new},
                         subresource="status")
    metrics.STATUS_WRITES.labels(KIND).inc()
    ctx.written[owner.uid] = new
    for event in status.transitions(old, new):
        kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)


async def cleanup(ctx: Context, body: dict[str, Any], retry: int) -> None:
    """The finalizer's work: the trainer's progress key. Artifacts stay for the models that serve them."""
    owner = Owner.of(body)
    try:
        await ctx.cache.delete_progress(owner.id)
    except CacheUnavailable as e:
        delay = min(60, 2 ** min(retry, 6))
        message = (f"cannot remove the Redis progress key yet, retrying in {delay}s ({e}); if the operator is gone "
                   f"for good, remove the finalizer by hand (docs/operator.md)")
        kopf.event(cast(kopf.Body, body), type="Warning", reason="CleanupFailed", message=message)
        # The whole status goes with it: an apply that left fields out would remove them.
        old = ctx.written.get(owner.uid) or dict(body.get("status") or {})
        stalled = conditions.condition(conditions.STALLED, True, "CleanupFailed", message,
                                       int(body["metadata"].get("generation") or 1), [], conditions.now())
        new = {**old, "conditions": [c for c in old.get("conditions") or [] if c.get("type") != conditions.STALLED]
               + [stalled]}
        await ctx.kube.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                              "metadata": {"name": owner.name, "namespace": owner.namespace}, "status": new},
                             subresource="status")
        ctx.written[owner.uid] = new
        raise kopf.TemporaryError(message, delay=delay) from e
    ctx.forget(owner.id, owner.uid)


def _needs_polling(body: kopf.Body, **_: Any) -> bool:
    """Workers report progress to Redis, and blockers resolve without an event the operator watches
    (a claim created, another job succeeding): those are polled. Everything else arrives as events."""
    if body["metadata"].get("deletionTimestamp"):
        return False
    current = body.get("status") or {}
    ready = conditions.find(current.get("conditions") or [], conditions.READY) or {}
    return current.get("phase") in (None, status.RUNNING) or ready.get("reason") in status.WAITING_REASONS


def register(ctx: Context, registry: kopf.OperatorRegistry) -> None:
    resource = (GROUP, VERSION, PLURAL)

    @kopf.index(*resource, id="kubelm_trainingjobs", registry=registry)
    def kubelm_trainingjobs(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): snapshot(body)}

    @kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS, id="kubelm_jobs", registry=registry)
    def kubelm_jobs(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
        owner = next((r["name"] for r in body["metadata"].get("ownerReferences") or () if r.get("kind") == KIND), None)
        return {(namespace, name): (owner, ObservedJob.from_body(body))} if owner else {}

    @kopf.index("", "v1", "pods", labels={**CHILD_LABELS, JOB_NAME_LABEL: kopf.PRESENT}, id="kubelm_pods",
                registry=registry)
    def kubelm_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[JOB_NAME_LABEL]): (body["metadata"]["name"], ObservedPod.from_body(body))}

    def indexes(kwargs: dict[str, Any]) -> dict[str, kopf.Index]:
        return {k: kwargs[k] for k in ("kubelm_trainingjobs", "kubelm_jobs", "kubelm_pods")}

    @kopf.on.resume(*resource, id="trainingjob", registry=registry)
    @kopf.on.create(*resource, id="trainingjob", registry=registry)
    @kopf.on.update(*resource, field="spec", id="trainingjob", registry=registry)
    async def trainingjob_changed(body: kopf.Body, reason: str, **kwargs: Any) -> None:
        await reconcile(ctx, snapshot(body), indexes(kwargs), str(reason))

    @kopf.timer(*resource, interval=ctx.config.progress_interval_seconds, id="trainingjob-tick",
                when=_needs_polling, registry=registry)
    async def trainingjob_tick(body: kopf.Body, **kwargs: Any) -> None:
        await reconcile(ctx, snapshot(body), indexes(kwargs), "timer")

    async def owner_changed(namespace: str, job_name: str, kwargs: dict[str, Any]) -> None:
        job = next(iter(kwargs["kubelm_jobs"].get((namespace, job_name), ())), None)
        owner = next(iter(kwargs["kubelm_trainingjobs"].get((namespace, job[0]), ())), None) if job else None
        if owner is not None:
            await reconcile(ctx, owner, indexes(kwargs), "child")

    @kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, id="trainingjob-job", registry=registry)
    async def job_event(namespace: str | None, name: str, type: str, **kwargs: Any) -> None:
        if type is not None and namespace:  # None: the initial listing, which resume already covers
            await owner_changed(namespace, name, kwargs)

    @kopf.on.event("", "v1", "pods", labels={**CHILD_LABELS, JOB_NAME_LABEL: kopf.PRESENT}, id="trainingjob-pod",
                   registry=registry)
    async def pod_event(namespace: str | None, labels: kopf.Labels, type: str, **kwargs: Any) -> None:
        if type is not None and namespace:
            await owner_changed(namespace, labels[JOB_NAME_LABEL], kwargs)

    @kopf.on.delete(*resource, id="trainingjob-cleanup", registry=registry)
    async def trainingjob_deleted(body: kopf.Body, retry: int, **_: Any) -> None:
        await cleanup(ctx, snapshot(body), retry)

