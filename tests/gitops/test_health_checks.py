"""Argo CD's health script and kstatus (Flux) read the status the operator writes, phase by phase.

The statuses come from the operator's own pure status functions, so a change there that would
confuse either GitOps tool fails here. No cluster: the script runs in Lua 5.1, kstatus as built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import gitops_support
from gitops_support import GitopsCheckError, argocd_health, kstatus
from kubelm_operator.status import serving, training
from kubelm_operator.status.observed import ObservedJob, ObservedPod

T0, T1 = "2026-11-30T10:00:00Z", "2026-11-30T10:05:00Z"
ARTIFACT = {"uri": "artifact://team-a/tiny@4", "version": 4, "digest": "sha256:ab"}


def _object(kind: str, status: dict[str, Any] | None, generation: int = 1, **metadata: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "kubelm.io/v1alpha1", "kind": kind,
                           "metadata": {"name": "m", "namespace": "team-a", "generation": generation, **metadata},
                           "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


def _job(**status: Any) -> ObservedJob:
    return ObservedJob.from_body({"metadata": {"name": "m-train"}, "spec": {"suspend": status.pop("suspend", False)},
                                  "status": status})


def _pod(**status: Any) -> ObservedPod:
    return ObservedPod.from_body({"metadata": {"name": "m-train-0-abcde", "creationTimestamp": T0}, "status": status})


def _tj(generation: int = 1, **observed: Any) -> dict[str, Any]:
    obs = training.Observation(**{"generation": generation, "suspend": False, "workers": 1, **observed})
    return _object("TrainingJob", training.compute({}, obs, T0), generation)


GATEWAY_UP = serving.ObservedDeployment("m-gateway", 1, 1, 1, 1)


def _lm(generation: int = 1, **observed: Any) -> dict[str, Any]:
    obs = serving.ServingObservation(**{
        "generation": generation, "suspend": False, "min_replicas": 1, "queue_name": "kubelm.team-a.m.requests",
        "endpoint": "http://m-gateway.team-a.svc:8080/v1", "gateway": GATEWAY_UP,
        "model": serving.ModelInfo("hub:gpt2@main", "main", "source:hub:gpt2@main"), **observed})
    return _object("LanguageModel", serving.compute({}, obs, T0), generation)


def _workers(replicas: int, ready: int) -> serving.ObservedDeployment:
    return serving.ObservedDeployment("m-worker", replicas, ready, ready, ready)


def _newer_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The same status after someone changed the spec in Git: the operator has not looked yet."""
    return {**obj, "metadata": {**obj["metadata"], "generation": obj["metadata"]["generation"] + 1}}


def _succeeded(artifact: bool) -> dict[str, Any]:
    progress = {"phase": "Succeeded", "step": 200, "totalSteps": 200, **({"artifact": ARTIFACT} if artifact else {})}
    job = _job(succeeded=1, startTime=T0, completionTime=T1,
               conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": T1}])
    return _tj(job=job, pods=[_pod(phase="Succeeded")], progress=progress)


def _failed() -> dict[str, Any]:
    pod = _pod(phase="Failed", containerStatuses=[{"name": "train", "state": {"terminated": {
        "reason": "OOMKilled", "exitCode": 137, "message": "allocating 4 GiB"}}}])
    job = _job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "Job has reached the specified backoff limit",
                                      "lastTransitionTime": T1}])
    return _tj(job=job, pods=[pod])


def _stale_ready_condition() -> dict[str, Any]:
    """status.observedGeneration current but the Ready condition older: never written by the operator,
    which computes all of them at once, but a hand-made status can say it."""
    obj = _newer_spec(_succeeded(artifact=True))
    obj["status"]["observedGeneration"] = 2
    return obj


QUEUE_CONFLICT = serving.Problem("QueueArgumentConflict", "spec.queue.maxLength: the existing queue has 100")
LOAD_FAILED = ObservedPod.from_body({"metadata": {"name": "m-worker-1"}, "status": {"phase": "Running",
    "containerStatuses": [{"name": "worker",
                           "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                           "lastState": {"terminated": {"exitCode": 1, "message": "model /m missing: no dir"}}}]}})


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], dict[str, Any]]
    argocd: str
    message: str
    """Argo CD's message, exactly; or its start when it ends with '…'."""
    kstatus: str


CASES = [
    # TrainingJob
    Case("tj-no-status-yet", lambda: _object("TrainingJob", None), "Progressing",
         "waiting for the operator to observe generation 1", "Current"),
    Case("tj-pending-creating", lambda: _tj(), "Progressing", "Creating: creating the training Job", "InProgress"),
    Case("tj-pending-waiting-for-another-job",
         lambda: _tj(blocker=training.Blocker("WaitingForTrainingJob", "waiting for TrainingJob 'first'", False)),
         "Progressing", "WaitingForTrainingJob: waiting for TrainingJob 'first'", "InProgress"),
    Case("tj-pending-claim-missing",
         lambda: _tj(blocker=training.Blocker("ClaimNotFound", "spec.dataset.train: PVC 'data' not found", True)),
         "Degraded", "spec.dataset.train: PVC 'data' not found", "Failed"),
    Case("tj-pending-unschedulable", lambda: _tj(job=_job(active=1), pods=[_pod(phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: no GPU"}])]),
         "Degraded", "pod m-train-0-abcde cannot be scheduled: 0/1 nodes: no GPU", "Failed"),
    Case("tj-running", lambda: _tj(job=_job(active=1, startTime=T0), pods=[_pod(phase="Running")],
                                   progress={"step": 40, "totalSteps": 300, "loss": 3.25}),
         "Progressing", "Running: 1 worker(s) training (step 40/300)", "InProgress"),
    Case("tj-running-before-first-progress", lambda: _tj(job=_job(active=1), pods=[_pod(phase="Running")]),
         "Progressing", "Running: 1 worker(s) training", "InProgress"),
    Case("tj-retrying", lambda: _tj(job=_job(active=1, failed=1), pods=[_pod(phase="Running")]),
         "Progressing", "Retrying: 1 worker pod(s) failed, retrying…", "InProgress"),
    Case("tj-succeeded", lambda: _succeeded(artifact=True), "Healthy",
         "model published as artifact://team-a/tiny@4", "Current"),
    Case("tj-succeeded-artifact-unreadable", lambda: _succeeded(artifact=False), "Progressing",
         "ArtifactUnknown: training finished but…", "InProgress"),
    Case("tj-failed", _failed, "Degraded",
         "BackoffLimitExceeded: Job has reached the specified backoff limit; pod m-train-0-abcde: OOMKilled…",
         "Failed"),
    Case("tj-suspended", lambda: _tj(suspend=True, job=_job(suspend=True)), "Suspended",
         "spec.suspend is true: no workers run; checkpoints are kept", "InProgress"),
    Case("tj-spec-changed", lambda: _newer_spec(_succeeded(artifact=True)), "Progressing",
         "waiting for the operator to observe generation 2", "InProgress"),
    Case("tj-stale-ready-condition", _stale_ready_condition, "Progressing",
         "waiting for the operator to observe generation 2", "Current"),
    Case("tj-being-deleted", lambda: _object("TrainingJob", _succeeded(artifact=True)["status"],
                                             deletionTimestamp=T1, finalizers=["kubelm.io/cleanup"]),
         "Progressing", "Pending deletion", "Terminating"),
    # LanguageModel
    Case("lm-no-status-yet", lambda: _object("LanguageModel", None, generation=3), "Progressing",
         "waiting for the operator to observe generation 3", "Current"),
    Case("lm-pending-creating", lambda: _lm(), "Progressing", "Creating: creating the workers", "InProgress"),
    Case("lm-pending-waiting-for-training",
         lambda: _lm(model=None, model_problem=serving.Problem("WaitingForTrainingJob", "waiting for 'tiny'", False)),
         "Progressing", "WaitingForTrainingJob: waiting for 'tiny'", "InProgress"),
    Case("lm-loading", lambda: _lm(workers=_workers(2, 0)), "Progressing",
         "Loading: waiting for a worker to load the model (0/2 ready)", "InProgress"),
    Case("lm-ready", lambda: _lm(workers=_workers(2, 2)), "Healthy", "2/2 workers ready", "Current"),
    Case("lm-gateway-not-ready", lambda: _lm(workers=_workers(1, 1), gateway=None), "Progressing",
         "GatewayNotReady: waiting for the gateway (0/1 ready); 1/1 workers ready", "InProgress"),
    Case("lm-scaled-to-zero", lambda: _lm(min_replicas=0, workers=_workers(0, 0)), "Healthy",
         "no backlog: no workers run until requests arrive", "Current"),
    Case("lm-degraded-while-scaling-up", lambda: _lm(workers=_workers(3, 1)), "Progressing",
         "WorkersNotReady: 1/3 workers ready", "InProgress"),
    Case("lm-degraded-queue-conflict", lambda: _lm(workers=_workers(1, 1), queue_problem=QUEUE_CONFLICT),
         "Degraded", "spec.queue.maxLength: the existing queue has 100", "Failed"),
    Case("lm-degraded-model-does-not-load", lambda: _lm(workers=_workers(1, 0), worker_pods=[LOAD_FAILED]),
         "Degraded", "pod m-worker-1: model /m missing: no dir", "Failed"),
    Case("lm-failed", lambda: _lm(model=None, model_problem=serving.Problem("ModelNotFound", "spec.model: no such")),
         "Degraded", "spec.model: no such", "Failed"),
    Case("lm-suspended", lambda: _lm(suspend=True, workers=_workers(0, 0)), "Suspended",
         "spec.suspend is true: no workers run; the queue is kept", "InProgress"),
    Case("lm-suspended-with-a-problem", lambda: _lm(suspend=True, workers=_workers(0, 0), queue_problem=QUEUE_CONFLICT),
         "Degraded", "spec.queue.maxLength: the existing queue has 100", "Failed"),
    Case("lm-spec-changed", lambda: _newer_spec(_lm(workers=_workers(1, 1))), "Progressing",
         "waiting for the operator to observe generation 2", "InProgress"),
]

COARSE = {"Healthy": "Current", "Degraded": "Failed", "Progressing": "InProgress"}
DISAGREE = {
    # kstatus takes an object without status (and without status.observedGeneration) as Current:
    # Flux may pass a wait before the operator's first status write.
    "tj-no-status-yet", "lm-no-status-yet",
    # kstatus has no Suspended: Ready=False without Reconciling or Stalled reads as InProgress.
    "tj-suspended", "lm-suspended",
    # kstatus compares only status.observedGeneration, never a condition's.
    "tj-stale-ready-condition",
    # Argo CD reports deletion as Progressing; kstatus as Terminating.
    "tj-being-deleted",
}


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return {case.name: case.make() for case in CASES}


@pytest.fixture(scope="module")
def kstatus_results(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return dict(zip(objects, kstatus(list(objects.values())), strict=True))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_argocd_health(case: Case, objects: dict[str, dict[str, Any]]) -> None:
    health = argocd_health(objects[case.name])
    assert health["status"] == case.argocd, health
    if case.message.endswith("…"):
        assert health["message"].startswith(case.message[:-1]), health
    else:
        assert health["message"] == case.message, health


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kstatus(case: Case, kstatus_results: dict[str, dict[str, str]]) -> None:
    assert kstatus_results[case.name]["status"] == case.kstatus, kstatus_results[case.name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_argocd_and_kstatus_agree_except_where_kstatus_cannot_tell(case: Case) -> None:
    agree = COARSE.get(case.argocd) == case.kstatus
    assert agree != (case.name in DISAGREE), f"{case.name}: Argo CD {case.argocd}, kstatus {case.kstatus}"


def test_every_phase_of_both_kinds_is_covered(objects: dict[str, dict[str, Any]]) -> None:
    phases = {(o["kind"], o["status"]["phase"]) for o in objects.values() if "status" in o}
    assert phases >= {("TrainingJob", p) for p in ("Pending", "Running", "Succeeded", "Failed", "Suspended")}
    assert phases >= {("LanguageModel", p)
                      for p in ("Pending", "Loading", "Ready", "Degraded", "Suspended", "Failed")}


def test_the_component_gives_argocd_the_script_under_both_keys() -> None:
    component = yaml.safe_load((gitops_support.ARGOCD_DIR / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    (generator,) = component["configMapGenerator"]
    assert (generator["name"], generator["behavior"]) == ("argocd-cm", "merge")
    assert generator["options"] == {"disableNameSuffixHash": True}
    keys = dict(entry.split("=", 1) for entry in generator["files"])
    assert {f"resource.customizations.health.kubelm.io_{kind}": path.name
            for kind, path in gitops_support.HEALTH_SCRIPTS.items()} == keys


def test_a_script_using_a_library_argocd_withholds_fails_here_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Healthy", message = string.format("%d", 1)}')
    monkeypatch.setitem(gitops_support.HEALTH_SCRIPTS, "TrainingJob", script)
    with pytest.raises(GitopsCheckError, match="string"):
        argocd_health(_object("TrainingJob", None))
    script.write_text('return {status = "Healthy", message = ("x"):upper()}')
    with pytest.raises(GitopsCheckError):
        argocd_health(_object("TrainingJob", None))


def test_a_script_answer_without_a_message_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Healthy"}')
    monkeypatch.setitem(gitops_support.HEALTH_SCRIPTS, "LanguageModel", script)
    with pytest.raises(GitopsCheckError, match=r"hs\.message"):
        argocd_health(_object("LanguageModel", None))
