"""LanguageModel: queues declared, registry entry written, workers and gateway applied, the workers
scaled from the queue, status kept from all of it.

Triggers: create/update/resume (render and apply), an event of its Deployments or worker pods that
changes what status reads, and a timer — every KUBELM_AUTOSCALE_INTERVAL_SECONDS for the builtin
autoscaler, every KUBELM_PROGRESS_INTERVAL_SECONDS otherwise (queue figures, a newer artifact of the
referenced TrainingJob). All run the same `reconcile` under the object's lock.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from kubelm_contract import queues, registry
from kubelm_contract.settings import SettingsError

from .. import autoscaling, metrics
from ..broker import BrokerUnavailable, QueueConflict
from ..builders import serving as build
from ..builders.common import GROUP, MANAGED_BY_LABEL, VERSION, Owner, labels
from ..cache import CacheUnavailable
from ..config import FIELD_MANAGER
from ..context import Context
from ..hashing import digest
from ..kube import ApiError
from ..spec import LanguageModelSpec, parse_languagemodel
from ..status import conditions
from ..status import serving as status
from ..status.observed import ObservedPod, controller, controller_uid
from .common import cleanup_failed, cleanup_given_up, write_status
from .common import snapshot as common_snapshot

log = logging.getLogger(__name__)
KIND, PLURAL = "LanguageModel", "languagemodels"
CHILD_LABELS = {MANAGED_BY_LABEL: FIELD_MANAGER}
MODEL_LABEL = "kubelm.io/languagemodel"
REGISTRY_REFRESH_SECONDS = 60.0
COUNTERS_SECONDS = 10.0
CONFLICT_RETRY_SECONDS = 30.0


@dataclass
class ServingState:
    """What the watches showed and what this operator decided, per LanguageModel (in memory)."""

    models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    deployments: dict[tuple[str, str], tuple[str, status.ObservedDeployment]] = field(default_factory=dict)
    """(namespace, name) -> (its controller's uid, the Deployment)."""
    worker_pods: dict[tuple[str, str], dict[str, ObservedPod]] = field(default_factory=dict)
    """(namespace, the model's label value) -> pod name -> what its containers say."""
    applied: dict[str, tuple[str, float]] = field(default_factory=dict)
    """uid -> (the generation and resolved source the children were last applied for, when): unchanged, they
    are sent again only after the resync interval, or when one of them is deleted."""
    rollouts: dict[tuple[str, str], int] = field(default_factory=dict)
    """(namespace, Deployment name) -> the generation the last apply of it produced."""
    scaling: dict[str, tuple[autoscaling.Recommendation, ...]] = field(default_factory=dict)
    """uid -> recent recommendations, for the stabilization windows."""
    scaled: dict[str, int] = field(default_factory=dict)
    """uid -> the replicas the autoscaler last wrote, until the Deployment watch shows them."""
    declared: dict[str, str] = field(default_factory=dict)
    """uid -> digest of the queue spec last declared."""
    registered: dict[str, tuple[str, float]] = field(default_factory=dict)
    """uid -> (digest of the registry entry last written, when)."""
    counters_read: dict[str, float] = field(default_factory=dict)
    conflicts: dict[str, tuple[str, float, status.Problem]] = field(default_factory=dict)
    """uid -> (queue spec digest, when, the problem) of a declaration RabbitMQ refused."""
    pruned: dict[str, frozenset[tuple[str, str, str]]] = field(default_factory=dict)
    """uid -> the children rendered when what was not rendered was last pruned."""
    queue_shown: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)
    """uid -> (when, the queue figures) status was last given."""
    deleting: set[str] = field(default_factory=set)
    """uids whose finalizer ran or runs: a reconciliation from an older event must not declare the queue again."""


def snapshot(body: Any) -> dict[str, Any]:
    return common_snapshot(body, KIND)


def _pinned(old: dict[str, Any]) -> tuple[dict[str, Any], status.ModelInfo] | None:
    """The source the status says is served, to keep serving when the TrainingJob it came from is gone."""
    model = old.get("model") or {}
    uri = model.get("source")
    if not isinstance(uri, str) or not uri:
        return None
    source = {"artifact": uri} if uri.startswith("artifact://") else {"uri": uri}
    return source, status.ModelInfo(uri, model.get("revision"), model.get("digest"))


async def _resolve(ctx: Context, owner: Owner, spec: LanguageModelSpec, old: dict[str, Any]) -> tuple[
        dict[str, Any] | None, status.ModelInfo | None, bool, status.Problem | None]:
    """(runtime model source, what status says about it, whether the digest is known, or the problem)."""
    model = spec.model
    if model.hub is not None:
        description = registry.describe_hub(model.hub.id, model.hub.revision)
        return ({"hub": dataclasses.asdict(model.hub)}, status.ModelInfo(description, model.hub.revision,
                                                                        registry.source_digest(description)),
                False, None)
    if model.uri is not None and model.uri.startswith("artifact://"):
        version = model.uri.rpartition("@")[2] if "@" in model.uri else None
        # The workers take the digest from the artifact's manifest; this entry keeps theirs.
        return {"artifact": model.uri}, status.ModelInfo(model.uri, f"v{version}" if version else None,
                                                          None), False, None
    if model.uri is not None:
        return {"uri": model.uri}, status.ModelInfo(model.uri, None, registry.source_digest(model.uri)), False, None
    assert model.training_job_ref is not None
    name, where = model.training_job_ref.name, "spec.model.trainingJobRef"
    job = await ctx.kube.get(f"{GROUP}/{VERSION}", "TrainingJob", owner.namespace, name)
    if job is None:
        if (pinned := _pinned(old)) is not None:
            # The artifact outlives its TrainingJob: keep serving it, and say no newer one will come.
            return pinned[0], pinned[1], bool(pinned[1].digest), status.Problem(
                "TrainingJobGone", f"{where}: TrainingJob {name!r} not found in namespace {owner.namespace}; "
                                   f"serving {pinned[1].source}, no newer version will be promoted", stalled=False,
                warning=True)
        return None, None, False, status.Problem(
            "TrainingJobNotFound", f"{where}: TrainingJob {name!r} not found in namespace {owner.namespace}")
    job_status = job.get("status") or {}
    artifact = job_status.get("artifact") or {}
    if job_status.get("phase") == "Failed":
        return None, None, False, status.Problem("TrainingJobFailed", f"{where}: TrainingJob {name!r} failed")
    if job_status.get("phase") != "Succeeded" or not artifact.get("uri"):
        return None, None, False, status.Problem(
            "WaitingForTrainingJob", f"{where}: waiting for TrainingJob {name!r} to succeed "
                                     f"(phase {job_status.get('phase') or 'Pending'})", stalled=False)
    uri = str(artifact["uri"])
    source = {"artifact": uri} if uri.startswith("artifact://") else {"uri": uri}
    revision = f"v{artifact['version']}" if artifact.get("version") else None
    return source, status.ModelInfo(uri, revision, artifact.get("digest")), bool(artifact.get("digest")), None


def registry_entry(owner: Owner, spec: LanguageModelSpec, model: status.ModelInfo, phase: str) -> dict[str, Any]:
    """The gateway's routing entry, the shape the workers write too, plus the model's phase."""
    return registry.model_entry(queue=queues.request_queue(owner.namespace, owner.name), namespace=owner.namespace,
                                digest=model.digest, source=model.source, limits=spec.limits.limits(),
                                defaults=spec.generation.decoding(), response_cache=spec.cache.responses.enabled,
                                phase=phase, response_cache_backend=spec.cache.responses.backend)


async def reconcile(ctx: Context, state: ServingState, body: dict[str, Any], trigger: str) -> None:
    owner = Owner.of(body)
    with metrics.reconciling(KIND, trigger):
        async with ctx.locks[owner.id]:
            await _reconcile(ctx, state, owner, body)
            ctx.reconciled[owner.uid] = ctx.clock()


async def _reconcile(ctx: Context, state: ServingState, owner: Owner, body: dict[str, Any]) -> None:
    if body["metadata"].get("deletionTimestamp") or owner.uid in state.deleting:
        return
    old = ctx.status_base(body)
    generation = int(body["metadata"].get("generation") or 1)
    queue_name = queues.request_queue(owner.namespace, owner.name)
    try:
        spec = parse_languagemodel(body.get("spec"))
    except SettingsError as e:
        obs = status.ServingObservation(generation, False, 0, queue_name, None,
                                        model_problem=status.Problem("InvalidSpec", str(e)))
        await _write_status(ctx, owner, body, old, obs)
        return
    source, model, digest_known, model_problem = await _resolve(ctx, owner, spec, old)
    queue_problem = cache_problem = scaling_problem = None
    queue_key = digest(dataclasses.asdict(spec.queue))
    conflict = state.conflicts.get(owner.uid)
    if conflict is not None and conflict[0] == queue_key and ctx.clock() - conflict[1] < CONFLICT_RETRY_SECONDS:
        # Refused already: RabbitMQ would refuse it again (and close the channel) every tick until the queue
        # is deleted; asked again now and then.
        queue_problem = conflict[2]
    elif state.declared.get(owner.uid) != queue_key:  # once per process and queue spec, not on every tick
        try:
            await ctx.broker.declare(owner.namespace, owner.name, spec.queue)
            state.declared[owner.uid] = queue_key
            state.conflicts.pop(owner.uid, None)
        except QueueConflict as e:
            queue_problem = status.Problem("QueueArgumentConflict", str(e))
            state.conflicts[owner.uid] = (queue_key, ctx.clock(), queue_problem)
        except BrokerUnavailable as e:
            queue_problem = status.Problem("BrokerUnavailable", str(e), stalled=False)
    names = build.names(owner)
    observed = _owned(state, owner, names.worker)
    if source is not None and model is not None:
        entry = registry_entry(owner, spec, model, old.get("phase") or "Pending")
        # Written when it changes, and again now and then in case Redis lost it (a restart without persistence).
        written = state.registered.get(owner.uid)
        if written is None or written[0] != digest(entry) or ctx.clock() - written[1] > REGISTRY_REFRESH_SECONDS:
            try:
                await ctx.cache.register_model(owner.id, entry, digest_known)
                state.registered[owner.uid] = (digest(entry), ctx.clock())
            except CacheUnavailable as e:
                cache_problem = status.Problem("RedisUnavailable", str(e), stalled=False)
        cache_problem = cache_problem or status.cache_backend_problem(
            spec.cache.responses.enabled, spec.cache.responses.backend, bool(ctx.config.memcached_url))
        # The children depend on the spec and the resolved source only: rendered again when either changes,
        # when one of them was deleted, and every resync interval (a hand edit is reverted then).
        inputs = f"{generation}:{digest(source)}"
        last = state.applied.get(owner.uid)
        if last is None or last[0] != inputs or ctx.clock() - last[1] >= ctx.resync_seconds(owner.uid):
            replicas = state.scaled.get(owner.uid, observed.replicas if observed is not None else None)
            children = build.children(owner, spec, image=ctx.config.runtime_image, model_source=source,
                                      amqp_url=ctx.config.amqp_url or "", redis_url=ctx.config.redis_url,
                                      rabbitmq_api_url=ctx.config.rabbitmq_api_url,
                                      memcached_url=ctx.config.memcached_url, worker_replicas=replicas)
            try:
                for child in children:
                    applied = await ctx.kube.apply(child)
                    if child["kind"] == "Deployment":
                        key = (owner.namespace, child["metadata"]["name"])
                        state.rollouts[key] = int(applied["metadata"].get("generation") or 0)
                        # The answer is newer than the watch: this status need not say "Creating" first,
                        # and the watch event bringing the same Deployment needs no reconciliation.
                        state.deployments[key] = (owner.uid, status.ObservedDeployment.from_body(applied))
                        if key[1] == names.worker:
                            observed = _owned(state, owner, names.worker)
                rendered = frozenset((c["apiVersion"], c["kind"], c["metadata"]["name"]) for c in children)
                if state.pruned.get(owner.uid) != rendered:  # once per process, then when the set changes
                    await _prune(ctx, owner, rendered)
                    state.pruned[owner.uid] = rendered
                state.applied[owner.uid] = (inputs, ctx.clock())
            except ApiError as e:
                if e.not_found and spec.autoscaling.engine == "keda":
                    scaling_problem = status.Problem(
                        "KedaNotInstalled", "spec.autoscaling.engine is keda but the cluster has no KEDA "
                                            "(ScaledObject and TriggerAuthentication are not served)", degrades=True)
                elif e.invalid:
                    model_problem = status.Problem("InvalidChild",
                                                   f"the API server refused a child object: {e.message}")
                else:
                    raise
    scaling = await _autoscale(ctx, state, owner, spec, observed) if observed is not None else []
    queue_figures, counters = await _figures(ctx, state, owner)
    if queue_figures is None and queue_problem is None:
        state.declared.pop(owner.uid, None)  # gone (deleted by hand, a broker reset): declared again next time
    queue_figures = _shown(ctx, state, owner, queue_figures, bool(scaling))
    pods = tuple(state.worker_pods.get((owner.namespace, labels(owner, build.WORKER)[MODEL_LABEL]), {}).values())
    gateway = _owned(state, owner, names.gateway) if spec.gateway.enabled else None
    gateway_problem = await _gateway_problem(ctx, owner, spec, gateway)
    obs = status.ServingObservation(
        generation, spec.suspend, spec.autoscaling.min_replicas, queue_name,
        build.endpoint(owner) if spec.gateway.enabled else None, model, model_problem, queue_problem,
        cache_problem, scaling_problem, observed, pods, queue_figures, counters, scaling, gateway, gateway_problem)
    await _write_status(ctx, owner, body, old, obs)


def _shown(ctx: Context, state: ServingState, owner: Owner, figures: dict[str, float] | None,
           scaled: bool) -> dict[str, float] | None:
    """The queue figures for status: new ones at most every COUNTERS_SECONDS (or with a scaling decision, which
    they explain), else None (status keeps what it shows). A busy queue changes its figures every tick; the
    autoscaler reads them live, status is for people and would otherwise be written every tick."""
    shown = state.queue_shown.get(owner.uid)
    if figures is None or (shown is not None and not scaled and shown[1] != figures
                           and ctx.clock() - shown[0] < COUNTERS_SECONDS):
        return None
    if shown is None or shown[1] != figures:
        state.queue_shown[owner.uid] = (ctx.clock(), figures)
    return figures


def _owned(state: ServingState, owner: Owner, name: str) -> status.ObservedDeployment | None:
    """The Deployment of that name when this incarnation of the model controls it (a same-named model deleted
    before may have left one for the garbage collector), with the generation the operator's apply made."""
    found = state.deployments.get((owner.namespace, name))
    if found is None or found[0] != owner.uid:
        return None
    return dataclasses.replace(found[1], applied_generation=state.rollouts.get((owner.namespace, name), 0))


async def _prune(ctx: Context, owner: Owner, rendered: frozenset[tuple[str, str, str]]) -> None:
    """Deletes what this model owns and the spec no longer asks for (a gateway disabled, KEDA's objects after
    a change of autoscaling engine): only objects whose controller is this very model."""
    for api_version, kind, name in build.owned_kinds(owner):
        if (api_version, kind, name) not in rendered and \
                await ctx.kube.delete_owned(api_version, kind, owner.namespace, name, owner.uid):
            log.info("%s: deleted %s %s, which the spec no longer asks for", owner.id, kind, name)


async def _gateway_problem(ctx: Context, owner: Owner, spec: LanguageModelSpec,
                           gateway: status.ObservedDeployment | None) -> status.Problem | None:
    """A gateway that is not ready because the Secret its key comes from is missing says so, by name."""
    ref = spec.gateway.auth_secret_ref
    if ref is None or not spec.gateway.enabled or spec.suspend or (gateway is not None and gateway.ready > 0):
        return None
    try:
        if await ctx.kube.exists("v1", "Secret", owner.namespace, ref.name):
            return None
    except ApiError as e:
        if e.forbidden:  # an install that does not grant it: the gateway's readiness says the rest
            return None
        raise
    return status.Problem("AuthSecretNotFound", f"spec.gateway.authSecretRef: Secret {ref.name!r} not found in "
                                                f"namespace {owner.namespace}; the gateway cannot start until it "
                                                "exists", degrades=True)


async def _figures(ctx: Context, state: ServingState, owner: Owner) -> tuple[
        dict[str, float] | None, dict[str, int] | None]:
    figures: dict[str, float] | None = None
    counters: dict[str, int] | None = None
    try:
        stats = await ctx.broker.stats(owner.namespace, owner.name)
        if stats is not None:
            figures = {"depth": stats.depth, "ready": stats.ready, "unacked": stats.unacked,
                       "consumers": stats.consumers, "deadLettered": stats.dead_lettered}
            # Rates change with every request: in status they would make every busy model write it each tick.
            metrics.QUEUE_PUBLISH_RATE.labels(owner.namespace, owner.name).set(stats.publish_rate)
            metrics.QUEUE_DELIVER_RATE.labels(owner.namespace, owner.name).set(stats.deliver_rate)
    except BrokerUnavailable as e:
        log.warning("%s: %s", owner.id, e)
    read_at = state.counters_read.get(owner.uid)
    if read_at is None or ctx.clock() - read_at >= COUNTERS_SECONDS:  # status only: no need for every tick
        try:
            counters = await ctx.cache.cache_counters(owner.id)
            state.counters_read[owner.uid] = ctx.clock()
        except CacheUnavailable as e:
            log.warning("%s: %s", owner.id, e)
    return figures, counters


async def _autoscale(ctx: Context, state: ServingState, owner: Owner, spec: LanguageModelSpec,
                     workers: status.ObservedDeployment) -> list[dict[str, Any]]:
    """The builtin autoscaler's tick: decide from the queue, write the Deployment's scale, record why."""
    if spec.autoscaling.engine != "builtin":
        return []
    current, written = autoscaling.replicas_now(workers.replicas, state.scaled.pop(owner.uid, None))
    if written is not None:
        state.scaled[owner.uid] = written
    if spec.suspend:
        figures = autoscaling.QueueFigures(0, 0)
    else:
        try:
            now = await ctx.broker.ready_now(owner.namespace, owner.name)
            stats = await ctx.broker.stats(owner.namespace, owner.name)
        except BrokerUnavailable as e:
            log.warning("%s: not scaling: %s", owner.id, e)
            return []
        if now is None:
            return []
        # Ready messages as of now; unacknowledged ones (being decoded) from the management API's last figures.
        figures = autoscaling.QueueFigures(now[0], stats.unacked if stats else 0, now[1])
    history = state.scaling.get(owner.uid) or autoscaling.seed(current, ctx.clock())
    decision = autoscaling.decide(spec.autoscaling, current, figures, ctx.clock(), history, spec.suspend)
    state.scaling[owner.uid] = decision.history
    if not decision.changes(current):
        return []
    await ctx.kube.scale("apps/v1", "Deployment", owner.namespace, build.names(owner).worker, decision.desired)
    state.scaled[owner.uid] = decision.desired
    record = {"time": conditions.now(), "from": current, "to": decision.desired, "reason": decision.reason}
    return [record]


async def _write_status(ctx: Context, owner: Owner, body: dict[str, Any], old: dict[str, Any],
                        obs: status.ServingObservation) -> None:
    new = status.compute(old, obs, conditions.now())
    events = conditions.phase_transitions(old, new, warning_phases=(status.FAILED, status.DEGRADED))
    events += [conditions.Transition("Normal", "Scaled", f"workers {r['from']} -> {r['to']}: {r['reason']}")
               for r in obs.scaling]
    await write_status(ctx, owner, body, old, new, events)


async def cleanup(ctx: Context, state: ServingState, body: dict[str, Any], retry: int) -> None:
    """The finalizer: queues and Redis keys go unless their deletionPolicy is Retain."""
    owner = Owner.of(body)
    spec = body.get("spec") or {}
    keep_queue = (spec.get("queue") or {}).get("deletionPolicy") == "Retain"
    keep_cache = (spec.get("cache") or {}).get("deletionPolicy") == "Retain"
    left = ", ".join(what for what, kept in (("its queues", keep_queue), ("its Redis keys", keep_cache)) if not kept)
    if left and (given_up := cleanup_given_up(ctx, body)) is not None:
        kopf.warn(cast(kopf.Body, body), reason="CleanupSkipped", message=f"{given_up}: left {left} in place")
        _forget(ctx, state, owner)
        return
    try:
        async with ctx.locks[owner.id]:  # after any reconciliation under way, and before none
            state.deleting.add(owner.uid)
            # Consumers and producers stop first: a worker reconnecting would declare the queue again, a
            # gateway starting would register the model again, and both would outlive the model.
            if running := await _stop_pods(ctx, state, owner):
                raise kopf.TemporaryError(f"waiting for {running} to stop before removing the queues", delay=2)
            if not keep_queue:
                await ctx.broker.delete(owner.namespace, owner.name)
            if not keep_cache:
                await ctx.cache.delete_model(owner.id, registry=True, responses=True)
    except (BrokerUnavailable, CacheUnavailable) as e:
        raise await cleanup_failed(ctx, owner, body, retry, e, "the model's queues or Redis keys") from e
    _forget(ctx, state, owner)


def _forget(ctx: Context, state: ServingState, owner: Owner) -> None:
    ctx.forget(owner.id, owner.uid)
    state.deleting.discard(owner.uid)
    state.worker_pods.pop((owner.namespace, labels(owner, build.WORKER)[MODEL_LABEL]), None)
    metrics.forget_model(owner.namespace, owner.name)
    for memory in (state.applied, state.scaling, state.scaled, state.declared, state.registered, state.counters_read,
                   state.queue_shown, state.conflicts, state.pruned):
        memory.pop(owner.uid, None)
    names = build.names(owner)
    for name in (names.worker, names.gateway):
        state.rollouts.pop((owner.namespace, name), None)


async def _stop_pods(ctx: Context, state: ServingState, owner: Owner) -> str | None:
    """Scales the workers and the gateway to zero (KEDA's ScaledObject removed first, so that it does not
    scale them up again) and says what still runs, or None once nothing does."""
    names = build.names(owner)
    await ctx.kube.delete_owned("keda.sh/v1alpha1", "ScaledObject", owner.namespace, names.worker, owner.uid)
    running: list[str] = []
    for name in (names.worker, names.gateway):
        deployment = _owned(state, owner, name)
        if deployment is not None and deployment.replicas:
            try:
                await ctx.kube.scale("apps/v1", "Deployment", owner.namespace, name, 0)
            except ApiError as e:
                if not e.not_found:
                    raise
    # Pods that are stopping (draining their batch) are no longer counted by their Deployment: asked for here.
    # A pod that never ran (Pending) cannot consume or register anything, and a deleted one never starts.
    for component in (build.WORKER, build.GATEWAY):
        selector = ",".join(f"{k}={v}" for k, v in build.selector_of(owner, component).items())
        pods = await ctx.kube.list("v1", "Pod", owner.namespace, selector)
        if started := [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]:
            running.append(f"{len(started)} {component} pod(s)")
    return " and ".join(running) or None


def _alive(body: kopf.Body) -> bool:
    return not body["metadata"].get("deletionTimestamp")


def _engine(body: kopf.Body) -> str:
    return str(((body.get("spec") or {}).get("autoscaling") or {}).get("engine") or "builtin")


def register(ctx: Context, registry: kopf.OperatorRegistry) -> None:
    resource = (GROUP, VERSION, PLURAL)
    state = ServingState()

    @kopf.on.resume(*resource, id="languagemodel", registry=registry)
    @kopf.on.create(*resource, id="languagemodel", registry=registry)
    @kopf.on.update(*resource, field="spec", id="languagemodel", registry=registry)
    async def languagemodel_changed(body: kopf.Body, reason: str, **_: Any) -> None:
        await reconcile(ctx, state, snapshot(body), str(reason))

    # The builtin autoscaler needs the queue often; every other model is looked at as often as training
    # progress (queue figures for status, a TrainingJob's newer artifact). A timer's first tick waits an
    # interval: a new model's create handler has just reconciled it.
    autoscale_every, tick_every = ctx.config.autoscale_interval_seconds, ctx.config.progress_interval_seconds

    @kopf.timer(*resource, interval=autoscale_every, initial_delay=autoscale_every, id="languagemodel-autoscale",
                when=lambda body, **_: _alive(body) and _engine(body) == "builtin", registry=registry)
    async def languagemodel_autoscale(body: kopf.Body, **_: Any) -> None:
        if ctx.tick_due(str(body["metadata"]["uid"]), autoscale_every):
            await reconcile(ctx, state, snapshot(body), "timer")

    @kopf.timer(*resource, interval=tick_every, initial_delay=tick_every, id="languagemodel-tick",
                when=lambda body, **_: _alive(body) and _engine(body) != "builtin", registry=registry)
    async def languagemodel_tick(body: kopf.Body, **_: Any) -> None:
        if ctx.tick_due(str(body["metadata"]["uid"]), tick_every):
            await reconcile(ctx, state, snapshot(body), "timer")

    @kopf.on.event(*resource, id="languagemodel-seen", registry=registry)
    async def languagemodel_seen(body: kopf.Body, namespace: str | None, name: str, type: str, **_: Any) -> None:
        if type == "DELETED":
            state.models.pop((str(namespace), name), None)
            ctx.gone(str(body["metadata"]["uid"]))
        else:
            state.models[(str(namespace), name)] = snapshot(body)

    def owner_of(namespace: str, body: kopf.Body) -> dict[str, Any] | None:
        """The model controlling the child, when it is this incarnation of it (the uid agrees)."""
        found = controller(body)
        model = state.models.get((namespace, found[1])) if found and found[0] == KIND else None
        return model if model is not None and found is not None and model["metadata"]["uid"] == found[2] else None

    async def child_deleted(namespace: str, body: kopf.Body) -> None:
        """A child deleted by hand (or by anyone but the garbage collector) is applied again at once."""
        model = owner_of(namespace, body)
        if model is not None and not model["metadata"].get("deletionTimestamp"):
            state.applied.pop(model["metadata"]["uid"], None)
            await reconcile(ctx, state, model, "child")

    @kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS, id="languagemodel-deployment",
                   registry=registry)
    async def deployment_event(body: kopf.Body, namespace: str | None, name: str, type: str, **_: Any) -> None:
        if not namespace:
            return
        owner_uid = controller_uid(body)
        if type == "DELETED" or owner_uid is None:
            state.deployments.pop((namespace, name), None)
            state.rollouts.pop((namespace, name), None)
            if type == "DELETED":
                await child_deleted(namespace, body)
            return
        before = state.deployments.get((namespace, name))
        state.deployments[(namespace, name)] = (owner_uid, status.ObservedDeployment.from_body(body))
        model = owner_of(namespace, body)
        # Only what status reads (replicas, readiness) is worth a reconciliation.
        if type is not None and model is not None and state.deployments[(namespace, name)] != before:
            await reconcile(ctx, state, model, "child")

    # Of the other children, a deletion is what matters at once; edits are reverted by the resync.
    for group, version, plural in (("", "v1", "configmaps"), ("", "v1", "services")):
        @kopf.on.event(group, version, plural, labels=CHILD_LABELS, id=f"languagemodel-{plural}",
                       registry=registry)
        async def other_child_event(body: kopf.Body, namespace: str | None, type: str, **_: Any) -> None:
            if namespace and type == "DELETED":
                await child_deleted(namespace, body)

    @kopf.on.event("", "v1", "pods", labels={**CHILD_LABELS, "app.kubernetes.io/component": build.WORKER},
                   id="languagemodel-worker-pod", registry=registry)
    async def worker_pod_event(body: kopf.Body, namespace: str | None, name: str, type: str, **_: Any) -> None:
        model_label = (body["metadata"].get("labels") or {}).get(MODEL_LABEL)
        if not namespace or not model_label:
            return
        pods = state.worker_pods.setdefault((namespace, model_label), {})
        if type == "DELETED":
            pods.pop(name, None)
        else:
            pods[name] = ObservedPod.from_body(body)
        # The label is the model's name unless that was too long for a label (then cut and hashed).
        model = state.models.get((namespace, model_label)) or next(
            (m for (ns, _), m in state.models.items()
             if ns == namespace and labels(Owner.of(m), build.WORKER)[MODEL_LABEL] == model_label), None)
        if type is not None and model is not None:
            await reconcile(ctx, state, model, "child")

    @kopf.on.delete(*resource, id="languagemodel-cleanup", registry=registry)
    async def languagemodel_deleted(body: kopf.Body, retry: int, **_: Any) -> None:
        await cleanup(ctx, state, snapshot(body), retry)
