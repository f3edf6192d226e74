"""TrainingJob: children made once the inputs exist, status kept from the Job, its pods and Redis.

Triggers: create/update/resume of the TrainingJob, any event of its Job or pods, and a
timer while it is not finished (Redis progress, waiting for claims or another job).
Every trigger runs the same level-based `reconcile` under the object's lock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any, cast

import kopf

from kubelm_contract.settings import SettingsError

from .. import metrics
from ..builders import training as build
from ..builders.common import GROUP, MANAGED_BY_LABEL, VERSION, Owner
from ..cache import CacheUnavailable
from ..config import FIELD_MANAGER
from ..context import Context
from ..kube import ApiError
from ..spec import TrainingJobSpec, parse_trainingjob
from ..status import conditions
from ..status import training as status
from ..status.observed import ObservedJob, ObservedPod, controller
from .common import cleanup_failed, cleanup_given_up, write_status
from .common import snapshot as common_snapshot

log = logging.getLogger(__name__)
KIND = "TrainingJob"
PLURAL = "trainingjobs"
CHILD_LABELS = {MANAGED_BY_LABEL: FIELD_MANAGER, "app.kubernetes.io/component": build.COMPONENT}
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
PODS_INDEX = "kubelm_pods"
ARTIFACT_UNKNOWN = "ArtifactUnknown"


def snapshot(body: Any) -> dict[str, Any]:
    return common_snapshot(body, KIND)


async def _claims_blocker(ctx: Context, namespace: str, spec: TrainingJobSpec) -> status.Blocker | None:
    claims = dict(spec.claims())
    if spec.storage.claim_name:
        claims.setdefault("spec.storage.claimName", spec.storage.claim_name)
    for field_path, claim in claims.items():
        if await ctx.kube.get("v1", "PersistentVolumeClaim", namespace, claim) is None:
            return status.Blocker("ClaimNotFound", f"{field_path}: PersistentVolumeClaim {claim!r} not found in "
                                                   f"namespace {namespace}; create it or fix the field", True)
    return None


async def _resolve_reference(ctx: Context, observed: Observed, owner: Owner, spec: TrainingJobSpec) -> tuple[
        str | None, status.Blocker | None]:
    """(artifact uri, None) once the referenced job succeeded with an artifact, else (None, why not)."""
    ref = spec.base_model.training_job_ref
    if ref is None:
        return None, None
    where = "spec.baseModel.trainingJobRef"
    if ref.name == owner.name:
        return None, status.Blocker("InvalidReference", f"{where}: a TrainingJob cannot start from itself", True)
    found = observed.trainingjobs.get((owner.namespace, ref.name)) or \
        await ctx.kube.get(f"{GROUP}/{VERSION}", KIND, owner.namespace, ref.name)
    if found is None:
        return None, status.Blocker("TrainingJobNotFound", f"{where}: TrainingJob {ref.name!r} not found in "
                                                           f"namespace {owner.namespace}", True)
    other = found.get("status") or {}
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


def _render(ctx: Context, owner: Owner, spec: TrainingJobSpec, artifact: str | None) -> list[dict[str, Any]]:
    return build.children(owner, spec, image=ctx.config.runtime_image, redis_url=ctx.config.redis_url,
                          artifact_uri=artifact, progress_interval_seconds=ctx.config.progress_interval_seconds)


async def _create_children(ctx: Context, owner: Owner, spec: TrainingJobSpec,
                           artifact: str | None) -> ObservedJob | None:
    """Applies what the pods mount, then creates the Job (once) and returns it, or the Job found under its
    name when one exists already (which may belong to an earlier TrainingJob of the same name)."""
    *others, job = _render(ctx, owner, spec, artifact)
    await asyncio.gather(*(ctx.kube.apply(obj) for obj in others))
    # The Job's pod template is immutable: create it once; only suspend changes afterwards.
    created = await ctx.kube.create(job)
    if created is None:  # it exists: the watch has not shown it yet (a restart, a burst), or it is not ours
        created = await ctx.kube.get("batch/v1", "Job", owner.namespace, job["metadata"]["name"])
    return ObservedJob.from_body(created) if created else None


def _foreign_job(owner: Owner, job: ObservedJob) -> status.Blocker:
    """Why a Job under this job's name is not taken for its own: an earlier incarnation's, on its way out
    (the garbage collector removes it), or one nobody here made."""
    if job.owner_uid is None:
        return status.Blocker("NameTaken", f"Job {job.name!r} exists and was not made for this TrainingJob; "
                                           "delete or rename it", True)
    return status.Blocker("WaitingForPreviousJob", f"Job {job.name!r} belongs to an earlier TrainingJob named "
                                                   f"{owner.name!r} and is being removed; waiting for it to go",
                          False)


def _ours(owner: Owner, job: ObservedJob | None) -> bool:
    return job is not None and job.owner_uid == owner.uid and not job.terminating


@dataclass
class Observed:
    """TrainingJobs and their Jobs as the watches last showed them, in plain dicts.

    Pods stay in a kopf index, whose start-up guarantee (complete before any handler runs)
    keeps a restarted operator from reporting a running job as waiting for its pods. These
    two kinds do without it: a Job the watch has not shown yet is read when creating it
    answers that it exists. Every new object of an indexed kind wakes every waiting
    worker, which at a few hundred objects cost more than the reconciliations themselves.
    """

    trainingjobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[tuple[str, str], ObservedJob] = field(default_factory=dict)
    """(namespace, Job name) -> the Job; its owner's uid tells an earlier incarnation's Job from the current."""
    repaired: dict[str, float] = field(default_factory=dict)
    """uid -> when (`clock`) the children the pods mount were last applied again."""


async def reconcile(ctx: Context, observed: Observed, pods: kopf.Index, body: dict[str, Any], trigger: str) -> None:
    owner = Owner.of(body)
    with metrics.reconciling(KIND, trigger):
        async with ctx.locks[owner.id]:
            await _reconcile(ctx, observed, pods, owner, body)
            ctx.reconciled[owner.uid] = ctx.clock()


async def _reconcile(ctx: Context, observed: Observed, pods_index: kopf.Index, owner: Owner,
                     body: dict[str, Any]) -> None:
    if body["metadata"].get("deletionTimestamp"):
        return  # going away: the finalizer cleans up, the garbage collector takes the children
    old = ctx.status_base(body)
    generation = int(body["metadata"].get("generation") or 1)
    try:
        spec = parse_trainingjob(body.get("spec"))
    except SettingsError as e:
        obs = status.Observation(generation, bool((body.get("spec") or {}).get("suspend")), 1,
                                 blocker=status.Blocker("InvalidSpec", str(e), True))
        await _write_status(ctx, owner, body, old, obs)
        return
    names = build.names(owner)
    found = observed.jobs.get((owner.namespace, names.job))
    observed_job = found if _ours(owner, found) else None
    blocker = _foreign_job(owner, found) if found is not None and observed_job is None else None
    finished = old.get("phase") in status.FINISHED
    if observed_job is None and blocker is None and not finished:
        artifact, blocker = await _resolve_reference(ctx, observed, owner, spec)
        effective, artifact = _from_reference(spec, artifact)
        blocker = blocker or await _claims_blocker(ctx, owner.namespace, effective)
        if blocker is None:
            try:
                # The answer lets this status say Suspended or Pending already instead of writing
                # "Creating" first; remembered, it also spares a reconciliation when the watch brings
                # the same Job.
                created = await _create_children(ctx, owner, effective, artifact)
                if created is not None:
                    observed.jobs[(owner.namespace, names.job)] = created
                    observed_job = created if _ours(owner, created) else None
                    blocker = None if observed_job is not None else _foreign_job(owner, created)
                observed.repaired[owner.uid] = ctx.clock()
            except ApiError as e:
                if not e.invalid:
                    raise
                blocker = status.Blocker("InvalidChild", f"the API server refused a child object: {e.message}", True)
    elif observed_job is not None and not finished:
        if observed_job.suspended != spec.suspend:
            await ctx.kube.merge_patch("batch/v1", "Job", owner.namespace, names.job,
                                       {"spec": {"suspend": spec.suspend}})
        await _repair(ctx, observed, owner, spec)
    pods = [pod for _, pod in pods_index.get((owner.namespace, names.job), ())
            if observed_job is not None and pod.owner_uid in (None, observed_job.uid)]
    progress = await _progress(ctx, owner, observed_job)
    obs = status.Observation(generation, spec.suspend, spec.workers, observed_job, pods, progress, blocker,
                             uid=owner.uid, checkpoints_kept=build.storage_claim(owner, spec) is not None)
    await _write_status(ctx, owner, body, old, obs)


async def _repair(ctx: Context, observed: Observed, owner: Owner, spec: TrainingJobSpec) -> None:
    """What the Job's pods mount (configuration, Secret, rendezvous Service) is applied again now and then
    while the job runs: a deleted or hand-edited one comes back before a restarted pod needs it. A no-op
    apply changes nothing on the server."""
    last = observed.repaired.get(owner.uid)
    if last is not None and ctx.clock() - last < ctx.resync_seconds(owner.uid):
        return
    artifact, blocker = await _resolve_reference(ctx, observed, owner, spec)
    if blocker is not None:
        return  # the referenced job is gone: the pods already have what they mount
    effective, artifact = _from_reference(spec, artifact)
    *others, _job = _render(ctx, owner, effective, artifact)
    await asyncio.gather(*(ctx.kube.apply(obj) for obj in others))
    observed.repaired[owner.uid] = ctx.clock()


async def _progress(ctx: Context, owner: Owner, job: ObservedJob | None) -> dict[str, Any] | None:
    """The trainer's report, read while workers run and whenever a finished Job is looked at: its pods'
    events may come after the Job's, and each status computed then needs the trainer's last words too.
    (A finished job is not polled, so this is a read per event of its Job or pods.)"""
    if job is None:
        return None
    if not (job.active or job.condition("Complete") or job.condition("Failed")):
        return None
    try:
        return await ctx.cache.progress(owner.id)
    except CacheUnavailable as e:
        log.warning("%s: %s; status keeps the last progress", owner.id, e)
        return None


async def _write_status(ctx: Context, owner: Owner, body: dict[str, Any], old: dict[str, Any],
                        obs: status.Observation) -> None:
    new = status.compute(old, obs, conditions.now())
    await write_status(ctx, owner, body, old, new, status.transitions(old, new))


async def cleanup(ctx: Context, body: dict[str, Any], retry: int) -> None:
    """The finalizer's work: the trainer's progress key. Artifacts stay for the models that serve them."""
    owner = Owner.of(body)
    try:
        await ctx.cache.delete_progress(owner.id)
    except CacheUnavailable as e:
        if (given_up := cleanup_given_up(ctx, body)) is None:
            raise await cleanup_failed(ctx, owner, body, retry, e, "the Redis progress key") from e
        kopf.warn(cast(kopf.Body, body), reason="CleanupSkipped", message=f"{given_up}: left its Redis progress key")
    ctx.forget(owner.id, owner.uid)


def _needs_polling(body: kopf.Body, **_: Any) -> bool:
    """Every job not finished is polled: workers report progress to Redis, blockers resolve without an
    event the operator watches (a claim created, another job succeeding), and a reconciliation started by
    a child's event is not retried when it fails (a transient API error). A finished job is polled while
    its artifact report could not be read (Redis away when it finished)."""
    if body["metadata"].get("deletionTimestamp"):
        return False
    current = body.get("status") or {}
    ready = conditions.find(current.get("conditions") or [], conditions.READY) or {}
    # A new object has no status yet: its create handler reconciles it, and kopf retries that on errors.
    if not current.get("phase"):
        return False
    return current.get("phase") not in status.FINISHED or ready.get("reason") == ARTIFACT_UNKNOWN


def register(ctx: Context, registry: kopf.OperatorRegistry) -> None:
    resource = (GROUP, VERSION, PLURAL)

    observed = Observed()

    @kopf.index("", "v1", "pods", labels={**CHILD_LABELS, JOB_NAME_LABEL: kopf.PRESENT}, id=PODS_INDEX,
                registry=registry)
    async def kubelm_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[JOB_NAME_LABEL]): (body["metadata"]["name"], ObservedPod.from_body(body))}

    @kopf.on.resume(*resource, id="trainingjob", registry=registry)
    @kopf.on.create(*resource, id="trainingjob", registry=registry)
    @kopf.on.update(*resource, field="spec", id="trainingjob", registry=registry)
    async def trainingjob_changed(body: kopf.Body, reason: str, **kwargs: Any) -> None:
        await reconcile(ctx, observed, kwargs[PODS_INDEX], snapshot(body), str(reason))

    @kopf.timer(*resource, interval=ctx.config.progress_interval_seconds,
                initial_delay=ctx.config.progress_interval_seconds, id="trainingjob-tick",
                when=_needs_polling, registry=registry)
    async def trainingjob_tick(body: kopf.Body, **kwargs: Any) -> None:
        if ctx.tick_due(str(body["metadata"]["uid"]), ctx.config.progress_interval_seconds):
            await reconcile(ctx, observed, kwargs[PODS_INDEX], snapshot(body), "timer")

    @kopf.on.event(*resource, id="trainingjob-seen", registry=registry)
    async def trainingjob_seen(body: kopf.Body, namespace: str | None, name: str, type: str, **_: Any) -> None:
        if type == "DELETED":
            observed.trainingjobs.pop((str(namespace), name), None)
            observed.repaired.pop(str(body["metadata"]["uid"]), None)
            ctx.gone(str(body["metadata"]["uid"]))
        else:
            observed.trainingjobs[(str(namespace), name)] = snapshot(body)

    async def owner_changed(namespace: str, owner_name: str | None, kubelm_pods: kopf.Index) -> None:
        owner = observed.trainingjobs.get((namespace, owner_name)) if owner_name else None
        if owner is not None:  # not yet seen: its own resume or create handler reconciles it
            await reconcile(ctx, observed, kubelm_pods, owner, "child")

    def job_owner(namespace: str, job_name: str) -> str | None:
        """The name of the TrainingJob controlling the Job, when it is the one the watch shows (same uid)."""
        job = observed.jobs.get((namespace, job_name))
        tj = observed.trainingjobs.get((namespace, job.owner_name)) if job and job.owner_name else None
        return job.owner_name if job is not None and tj is not None and tj["metadata"]["uid"] == job.owner_uid \
            else None

    @kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, id="trainingjob-job", registry=registry)
    async def job_event(body: kopf.Body, namespace: str | None, name: str, type: str, **kwargs: Any) -> None:
        if not namespace:
            return
        before = observed.jobs.get((namespace, name))
        if type == "DELETED":
            observed.jobs.pop((namespace, name), None)
        else:
            observed.jobs[(namespace, name)] = ObservedJob.from_body(body)
        # None: the initial listing, which the owners' resume handlers cover. An event that changes nothing
        # status reads (most of a Job's are bookkeeping of the Job controller) needs no reconciliation.
        # The owner is named by the Job's own reference: a deleted Job (by hand, or an earlier incarnation's
        # removed by the garbage collector) wakes the TrainingJob of that name, which makes its Job again.
        if type is not None and observed.jobs.get((namespace, name)) != before:
            found = controller(body)
            await owner_changed(namespace, found[1] if found and found[0] == KIND else None, kwargs[PODS_INDEX])

    @kopf.on.event("", "v1", "pods", labels={**CHILD_LABELS, JOB_NAME_LABEL: kopf.PRESENT}, id="trainingjob-pod",
                   registry=registry)
    async def pod_event(namespace: str | None, labels: kopf.Labels, type: str, **kwargs: Any) -> None:
        if type is not None and namespace:
            await owner_changed(namespace, job_owner(namespace, labels[JOB_NAME_LABEL]), kwargs[PODS_INDEX])

    @kopf.on.delete(*resource, id="trainingjob-cleanup", registry=registry)
    async def trainingjob_deleted(body: kopf.Body, retry: int, **_: Any) -> None:
        await cleanup(ctx, snapshot(body), retry)

