"""LanguageModel status from observations: phases, part conditions, queue figures, scaling history."""

from __future__ import annotations

from typing import Any

from kubelm_operator.status import serving as status
from kubelm_operator.status.conditions import phase_transitions

T0, T1 = "2026-11-30T10:00:00Z", "2026-11-30T10:01:00Z"
MODEL = status.ModelInfo("hub:gpt2@main", "main", "source:hub:gpt2@main")
GATEWAY_UP = status.ObservedDeployment("m-gateway", 1, 1, 1, 1)


def _obs(**kwargs: Any) -> status.ServingObservation:
    base: dict[str, Any] = {"generation": 1, "suspend": False, "min_replicas": 1, "queue_name": "kubelm.ns.m.requests",
                            "endpoint": "http://m-gateway.ns.svc:8080/v1", "gateway": GATEWAY_UP, "model": MODEL}
    return status.ServingObservation(**{**base, **kwargs})


def _workers(replicas: int | None, ready: int) -> status.ObservedDeployment:
    return status.ObservedDeployment("m-worker", replicas, ready, ready, ready)


def _conditions(s: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in s["conditions"]}


def test_ready_when_every_desired_worker_is_ready() -> None:
    s = status.compute({}, _obs(workers=_workers(2, 2), queue={"depth": 3, "ready": 3, "unacked": 0,
                                                              "consumers": 2, "deadLettered": 0},
                                cache={"hits": 4, "misses": 6}), T0)
    assert (s["phase"], s["readyReplicas"], s["desiredReplicas"]) == ("Ready", 2, 2)
    assert s["queue"] == {"name": "kubelm.ns.m.requests", "depth": 3, "ready": 3, "unacked": 0, "consumers": 2,
                          "deadLettered": 0}
    assert s["model"] == {"source": "hub:gpt2@main", "revision": "main", "digest": "source:hub:gpt2@main"}
    assert s["cache"] == {"hits": 4, "misses": 6} and s["endpoint"].endswith("/v1")
    assert _conditions(s) == {"Ready": ("True", "WorkersReady"), "Reconciling": ("False", "Ready"),
                              "Stalled": ("False", "Ready"), "QueueReady": ("True", "Declared"),
                              "CacheReady": ("True", "Registered"), "ModelReady": ("True", "Resolved")}


def test_loading_degraded_and_scaled_to_zero() -> None:
    assert status.compute({}, _obs(workers=_workers(2, 0)), T0)["phase"] == "Loading"
    assert status.compute({}, _obs(workers=_workers(3, 1)), T0)["phase"] == "Degraded"
    zero = status.compute({}, _obs(min_replicas=0, workers=_workers(0, 0)), T0)
    assert (zero["phase"], _conditions(zero)["Ready"]) == ("Ready", ("True", "ScaledToZero"))


def test_a_model_with_a_gateway_is_ready_only_once_the_gateway_is() -> None:
    for gateway in (None, status.ObservedDeployment("m-gateway", 2, 0, 0, 0)):
        s = status.compute({}, _obs(workers=_workers(1, 1), gateway=gateway), T0)
        assert (s["phase"], _conditions(s)["Ready"]) == ("Loading", ("False", "GatewayNotReady"))
        assert _conditions(s)["Reconciling"][0] == "True" and _conditions(s)["Stalled"][0] == "False"
    waiting = status.compute({}, _obs(min_replicas=0, workers=_workers(0, 0), gateway=None), T0)
    assert waiting["conditions"][0]["message"].startswith("waiting for the gateway (0/1 ready); no backlog")
    without = status.compute({}, _obs(endpoint=None, gateway=None, workers=_workers(1, 1)), T0)
    assert without["phase"] == "Ready"  # no gateway asked for: the workers are the service


def test_waiting_for_a_training_job_is_pending_not_stalled() -> None:
    problem = status.Problem("WaitingForTrainingJob", "spec.model.trainingJobRef: waiting", stalled=False)
    s = status.compute({}, _obs(model=None, model_problem=problem), T0)
    assert s["phase"] == "Pending"
    assert _conditions(s)["ModelReady"] == ("False", "WaitingForTrainingJob")
    assert _conditions(s)["Stalled"][0] == "False" and _conditions(s)["Reconciling"][0] == "True"


def test_a_queue_conflict_degrades_and_names_the_field() -> None:
    problem = status.Problem("QueueArgumentConflict", "spec.queue.maxLength: the existing queue ...")
    s = status.compute({"phase": "Ready"}, _obs(workers=_workers(1, 1), queue_problem=problem), T0)
    assert s["phase"] == "Degraded" and _conditions(s)["QueueReady"] == ("False", "QueueArgumentConflict")
    events = phase_transitions({"phase": "Ready"}, s, warning_phases=("Failed", "Degraded"))
    assert [(e.type, e.reason) for e in events] == [("Warning", "Degraded")]
    assert "spec.queue.maxLength" in events[0].message


def test_suspended_keeps_the_queue_and_has_no_workers() -> None:
    s = status.compute({}, _obs(suspend=True, workers=_workers(0, 0)), T0)
    assert (s["phase"], s["desiredReplicas"]) == ("Suspended", 0)


def test_scaling_history_is_bounded_and_the_same_observation_changes_nothing() -> None:
    old: dict[str, Any] = {}
    for i in range(12):
        old = status.compute(old, _obs(workers=_workers(1, 1), scaling=[
            {"time": f"2026-11-30T10:00:{i:02d}Z", "from": i, "to": i + 1, "reason": "r"}]), T0)
    assert len(old["scalingHistory"]) == 10 and old["scalingHistory"][-1]["to"] == 12
    assert old["lastScaleTime"] == "2026-11-30T10:00:11Z"
    assert status.compute(old, _obs(workers=_workers(1, 1)), T1) == old


def test_a_worker_that_cannot_load_its_model_degrades_with_its_reason() -> None:
    from kubelm_operator.status.observed import ObservedPod

    pod = ObservedPod.from_body({"metadata": {"name": "m-worker-1"}, "status": {"phase": "Running",
        "containerStatuses": [{"name": "worker",
                               "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                               "lastState": {"terminated": {"exitCode": 1, "message": "model /m missing: no dir"}}}]}})
    s = status.compute({}, _obs(workers=_workers(1, 0), worker_pods=[pod]), T0)
    assert s["phase"] == "Degraded"
    assert _conditions(s)["ModelReady"] == ("False", "ModelLoadFailed")
    crashing = ObservedPod.from_body({"metadata": {"name": "m-worker-2"}, "status": {"containerStatuses": [{
        "name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}})
    assert _conditions(status.compute({}, _obs(workers=_workers(1, 0), worker_pods=[crashing]), T0))[
        "ModelReady"] == ("False", "ImagePullBackOff")


def test_a_worker_no_node_can_take_is_degraded_with_the_schedulers_message() -> None:
    from kubelm_operator.status.observed import ObservedPod

    pod = ObservedPod.from_body({"metadata": {"name": "m-worker-1"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}})
    s = status.compute({}, _obs(workers=_workers(1, 0), worker_pods=[pod]), T0)
    assert (s["phase"], _conditions(s)["ModelReady"]) == ("Degraded", ("False", "Unschedulable"))
    assert _conditions(s)["Stalled"] == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in next(c["message"] for c in s["conditions"] if c["type"] == "Ready")


def test_a_replaced_model_goes_to_the_bounded_revision_history() -> None:
    old = status.compute({}, _obs(workers=_workers(1, 1)), T0)
    assert "revisions" not in old
    for version in range(2, 9):
        model = status.ModelInfo(f"artifact://ns/job@{version}", f"v{version}", f"sha256:{version}")
        old = status.compute(old, _obs(model=model, workers=_workers(1, 1)), f"2026-11-30T10:00:0{version}Z")
    assert [r["source"] for r in old["revisions"]] == [f"artifact://ns/job@{v}" for v in range(3, 8)]
    assert old["revisions"][-1] == {"source": "artifact://ns/job@7", "revision": "v7", "digest": "sha256:7",
                                    "until": "2026-11-30T10:00:08Z"}
    assert status.compute(old, _obs(model=status.ModelInfo("artifact://ns/job@8", "v8", "sha256:8"),
                                    workers=_workers(1, 1)), T1) == old


def test_a_cache_asked_of_memcached_without_one_degrades_and_says_so() -> None:
    assert status.cache_backend_problem(True, "memcached", True) is None
    assert status.cache_backend_problem(False, "memcached", False) is None  # no cache, nothing missing
    assert status.cache_backend_problem(True, "redis", False) is None
    problem = status.cache_backend_problem(True, "memcached", False)
    s = status.compute({}, _obs(workers=_workers(1, 1), cache_problem=problem), T0)
    assert s["phase"] == "Degraded" and _conditions(s)["CacheReady"] == ("False", "MemcachedNotConfigured")


def _rolling(**kwargs: Any) -> status.ObservedDeployment:
    base: dict[str, Any] = {"name": "m-worker", "replicas": 1, "ready": 1, "updated": 1, "available": 1,
                            "current": 1, "observed_generation": 3, "applied_generation": 3}
    return status.ObservedDeployment(**{**base, **kwargs})


def test_ready_only_once_the_new_revision_serves() -> None:
    """Old pods answering with old weights while the status shows the new source is not Ready."""
    # The controller has not acted on the operator's latest apply yet: its figures are the old revision's.
    lagging = status.compute({}, _obs(workers=_rolling(observed_generation=2)), T0)
    # A new pod is up beside the old one (maxSurge): two pods, one of them updated.
    surging = status.compute({}, _obs(workers=_rolling(current=2, ready=2, updated=1, available=2)), T0)
    for s in (lagging, surging):
        assert (s["phase"], _conditions(s)["Ready"], _conditions(s)["Reconciling"][0]) == \
            ("Loading", ("False", "RollingOut"), "True")
    done = status.compute({}, _obs(workers=_rolling()), T0)
    assert _conditions(done)["Ready"] == ("True", "WorkersReady")
    # The autoscaler's writes move the generation too, but only the operator's applies are waited for.
    scaled = status.compute({}, _obs(workers=_rolling(observed_generation=2, applied_generation=1)), T0)
    assert _conditions(scaled)["Ready"] == ("True", "WorkersReady")


def test_the_gateway_must_have_rolled_out_too() -> None:
    gateway = _rolling(name="m-gateway", current=2, updated=1, ready=2)
    s = status.compute({}, _obs(workers=_rolling(), gateway=gateway), T0)
    assert (s["phase"], _conditions(s)["Ready"]) == ("Loading", ("False", "GatewayRollingOut"))


def test_a_missing_auth_secret_is_named_instead_of_waiting_for_the_gateway() -> None:
    problem = status.Problem("AuthSecretNotFound", "spec.gateway.authSecretRef: Secret 'key' not found",
                             degrades=True)
    s = status.compute({}, _obs(workers=_workers(1, 1), gateway=status.ObservedDeployment("m-gateway", 1),
                                gateway_problem=problem), T0)
    assert (s["phase"], _conditions(s)["Ready"], _conditions(s)["Stalled"]) == (
        "Degraded", ("False", "AuthSecretNotFound"), ("True", "AuthSecretNotFound"))
    assert "Secret 'key' not found" in s["conditions"][0]["message"]


def test_a_warning_keeps_the_phase_and_is_said_in_its_condition() -> None:
    gone = status.Problem("TrainingJobGone", "spec.model.trainingJobRef: TrainingJob 'tj' not found; serving "
                                             "artifact://ns/tj@2", stalled=False, warning=True)
    s = status.compute({}, _obs(workers=_workers(1, 1), model_problem=gone), T0)
    assert (s["phase"], _conditions(s)["Ready"], _conditions(s)["ModelReady"]) == (
        "Ready", ("True", "WorkersReady"), ("True", "TrainingJobGone"))
