"""What `kubelm` says about each state, from statuses the operator's own status functions compute (no cluster):
the explain sentence for each failure the CLI promises to name, the status rows and the describe sections."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from kubelm_operator.cli import summary
from kubelm_operator.cli.explain import explain
from kubelm_operator.status import serving, training
from kubelm_operator.status.observed import ObservedJob, ObservedPod

T0 = "2026-11-30T10:00:00Z"
NOW = datetime.datetime(2026, 11, 30, 10, 5, tzinfo=datetime.UTC)


def _tj(status: dict[str, Any], spec: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return {"kind": "TrainingJob", "metadata": {"name": "story", "namespace": "ml", "generation": generation},
            "spec": spec or {}, "status": status}


def _lm(status: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "LanguageModel", "metadata": {"name": "chat", "namespace": "ml", "generation": 1},
            "spec": spec or {}, "status": status}


def _training(**kwargs: Any) -> dict[str, Any]:
    return training.compute({}, training.Observation(**{"generation": 1, "suspend": False, "workers": 1, **kwargs}), T0)


GATEWAY_UP = serving.ObservedDeployment("chat-gateway", 1, 1, 1, 1)


def _serving(**kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"generation": 1, "suspend": False, "min_replicas": 1,
                            "queue_name": "kubelm.ml.chat.requests",
                            "endpoint": "http://chat-gateway.ml.svc:8080/v1", "gateway": GATEWAY_UP,
                            "model": serving.ModelInfo("hub:gpt2@main", "main", "sha256:" + "cd" * 32)}
    return serving.compute({}, serving.ServingObservation(**{**base, **kwargs}), T0)


def _pod(**status: Any) -> ObservedPod:
    return ObservedPod.from_body({"metadata": {"name": "story-train-0-x", "creationTimestamp": T0}, "status": status})


UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}
RUNNING = {"phase": "Running", "step": 40, "totalSteps": 200, "loss": 3.25, "percent": 20.0, "etaSeconds": 95}


@pytest.mark.parametrize(("obj", "ready", "reason", "words"), [
    (_tj(_training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {}}),
                   pods=[_pod(**UNSCHEDULABLE)]), {"resources": {"gpus": 4}}),
     False, "Unschedulable", ["No node has the 4 GPU(s) per worker", "Insufficient nvidia.com/gpu",
                              "NVIDIA device plugin", "spec.tolerations"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 1), worker_pods=[_pod(**UNSCHEDULABLE)]),
         {"resources": {"gpus": 1}}),
     False, "Unschedulable", ["No node has the 1 GPU(s) per replica"]),
    (_tj(_training(blocker=training.Blocker("ClaimNotFound", "spec.dataset.train: PersistentVolumeClaim 'corpus' "
                                            "not found in namespace ml", True))),
     False, "ClaimNotFound", ["PersistentVolumeClaim it needs is missing", "'corpus'"]),
    (_lm(_serving(model=None, model_problem=serving.Problem("ModelLoadFailed", "pod chat-worker-1: model /m: no "
                                                             "such directory", degrades=True))),
     False, "ModelLoadFailed", ["model source is missing or cannot be loaded", "no such directory", "spec.model"]),
    (_lm(_serving(queue_problem=serving.Problem("QueueArgumentConflict", "spec.queue.type: the queue exists as "
                                                 "quorum, the spec asks for classic"))),
     False, "QueueArgumentConflict", ["already exists with other arguments", "spec.queue.type", "delete the queue"]),
    (_tj(_training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {
        "failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit"}]}}),
        pods=[_pod(phase="Failed", containerStatuses=[{"name": "train", "state": {"terminated": {
            "exitCode": 137, "reason": "OOMKilled", "message": "step 3 loss 4.1"}}}])],
        progress={"phase": "Failed", "message": "RuntimeError: can't allocate memory"})),
     False, "BackoffLimitExceeded", ["Training failed with its last reported error", "OOMKilled",
                                     "can't allocate memory", "Raise spec.resources.memory"]),
    (_tj(_training(blocker=training.Blocker("WaitingForTrainingJob", "spec.baseModel.trainingJobRef: waiting for "
                                            "TrainingJob 'first' to succeed", False))),
     False, "WaitingForTrainingJob", ["Waiting for a TrainingJob to succeed", "'first'"]),
    (_lm(_serving(model=None, model_problem=serving.Problem("WaitingForTrainingJob", "spec.model.trainingJobRef: "
                                                             "waiting for TrainingJob 'story'", stalled=False))),
     False, "WaitingForTrainingJob", ["Waiting for a TrainingJob to succeed", "'story'"]),
    (_lm(_serving(model=None, model_problem=serving.Problem("TrainingJobNotFound", "spec.model.trainingJobRef: "
                                                             "TrainingJob 'gone' not found in namespace ml"))),
     False, "TrainingJobNotFound", ["does not exist", "spec.model.trainingJobRef"]),
    (_tj(_training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {"active": 1}}),
                   pods=[_pod(phase="Running")], progress=RUNNING)),
     False, "Running", ["step 40/200", "1m35s left"]),
    (_tj(_training(suspend=True, blocker=None)), False, "Suspended", ["suspended", "spec.suspend"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 2, 2, 2, 2))), True, "WorkersReady",
     ["Ready: 2/2 workers"]),
    (_lm(_serving(min_replicas=0, workers=serving.ObservedDeployment("chat-worker", 0))), True, "ScaledToZero",
     ["no requests wait"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1), gateway=None)),
     False, "GatewayNotReady", ["gateway is not ready yet", "0/1 ready", "describe pod"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1),
                  cache_problem=serving.cache_backend_problem(True, "memcached", False))),
     False, "MemcachedNotConfigured", ["KUBELM_MEMCACHED_URL", "spec.cache.responses.backend", "serves meanwhile"]),
    (_tj({}), False, "NotObserved", ["has not written a status yet"]),
    (_tj(_training(blocker=training.Blocker("WaitingForPreviousJob", "Job 'j-train' belongs to an earlier "
                                                                        "TrainingJob named 'j'", False))),
     False, "WaitingForPreviousJob", ["earlier TrainingJob of the same name", "once it is gone"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 1, 2, 1, 2, current=2, observed_generation=2,
                                                     applied_generation=2))),
     False, "RollingOut", ["new revision", "older one"]),
    (_lm(_serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1), gateway=serving.ObservedDeployment(
        "chat-gateway", 1), gateway_problem=serving.Problem("AuthSecretNotFound", "Secret 'k' not found",
                                                             degrades=True))),
     False, "AuthSecretNotFound", ["API key Secret is missing", "Secret 'k' not found", "authSecretRef"]),
])
def test_each_state_gets_its_sentence(obj: dict[str, Any], ready: bool, reason: str, words: list[str]) -> None:
    why = explain(obj)
    assert (why.ready, why.reason) == (ready, reason), why
    for word in words:
        assert word in why.sentence, why.sentence


def test_a_spec_the_operator_has_not_seen_is_not_explained_by_an_old_status() -> None:
    obj = _tj(_training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {"active": 1}}),
                        pods=[_pod(phase="Running")]), generation=2)
    why = explain(obj)
    assert (why.ready, why.reason) == (False, "NotObserved")
    assert "generation 2" in why.sentence


def test_succeeded_job_names_its_artifact() -> None:
    artifact = {"uri": "artifact://ml/story@3", "version": 3, "digest": "sha256:ab", "metrics": {"evalLoss": 1.5}}
    status = _training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {
        "succeeded": 1, "completionTime": T0, "conditions": [{"type": "Complete", "status": "True"}]}}),
        progress={"phase": "Succeeded", "step": 10, "totalSteps": 10, "loss": 1.25, "artifact": artifact})
    why = explain(_tj(status))
    assert why.ready and "artifact://ml/story@3 (version 3)" in why.sentence
    row = summary.training_row(_tj(status))
    assert (row.phase, row.step, row.total_steps, row.loss, row.artifact) == (
        "Succeeded", 10, 10, 1.25, "artifact://ml/story@3 (v3)")


def test_model_row_carries_queue_cache_and_the_last_scaling_decision() -> None:
    status = serving.compute({}, serving.ServingObservation(
        generation=1, suspend=False, min_replicas=1, queue_name="q", endpoint=None,
        model=serving.ModelInfo("hub:gpt2@main", "main", "sha256:" + "cd" * 32),
        workers=serving.ObservedDeployment("chat-worker", 3, 2, 3, 2),
        queue={"depth": 40, "ready": 30, "unacked": 10, "consumers": 2, "deadLettered": 1},
        cache={"hits": 3, "misses": 1},
        scaling=[{"time": T0, "from": 1, "to": 3, "reason": "backlog 40 over 2 workers"}]), T0)
    row = summary.model_row(_lm(status))
    assert row.to_dict() == {
        "namespace": "ml", "name": "chat", "phase": "Degraded", "ready": False, "readyReplicas": 2,
        "desiredReplicas": 3, "queueDepth": 40, "unacked": 10, "deadLettered": 1, "cacheHitRatio": 0.75,
        "lastScaling": "1 -> 3: backlog 40 over 2 workers", "lastScalingTime": T0,
        "modelDigest": "sha256:" + "cd" * 32, "reason": "WorkersNotReady"}


def test_describe_has_conditions_events_scaling_and_revisions() -> None:
    status = _serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1),
                      scaling=[{"time": T0, "from": 0, "to": 1, "reason": "1 request waiting"}])
    status["revisions"] = [{"source": "hub:gpt2@old", "revision": "old", "digest": "sha256:00", "until": T0}]
    events = [{"type": "Normal", "reason": "Scaled", "message": "workers 0 -> 1",
               "lastTimestamp": "2026-11-30T10:04:00Z"},
              {"type": "Normal", "reason": "Ready", "note": "Pending -> Ready",
               "eventTime": "2026-11-30T10:04:30.123456Z"}]
    sections = {s.title: s for s in summary.describe(_lm(status), events, NOW)}
    assert list(sections) == ["Summary", "Conditions", "Serving", "Scaling history", "Revisions", "Events"]
    assert ("Ready", "True", "WorkersReady", "5m", "1/1 workers ready") in sections["Conditions"].rows
    assert sections["Scaling history"].rows == (("5m", "0", "1", "1 request waiting"),)
    assert sections["Revisions"].rows == ((T0, "hub:gpt2@old", "old", "sha256:00"),)
    assert sections["Events"].rows == (("1m", "Normal", "Scaled", "workers 0 -> 1"),
                                       ("30s", "Normal", "Ready", "Pending -> Ready"))


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (59, "59s"), (95, "1m35s"), (7260, "2h01m")])
def test_durations(seconds: int | None, text: str) -> None:
    assert summary.duration(seconds) == text


def test_the_table_shows_short_digests_and_progress() -> None:
    from rich.console import Console

    from kubelm_operator.cli import render

    status = _serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1))
    hub = _serving(workers=serving.ObservedDeployment("chat-worker", 1, 1, 1, 1),
                   model=serving.ModelInfo("hub:gpt2@main", "main", "source:hub:gpt2@main"))
    running = _training(job=ObservedJob.from_body({"metadata": {"name": "j"}, "spec": {}, "status": {"active": 1}}),
                        pods=[_pod(phase="Running")], progress=RUNNING)
    console = Console(width=200, record=True, color_system=None)
    console.print(render.overview([summary.model_row(_lm(status)), summary.model_row(_lm(hub))],
                                  [summary.training_row(_tj(running))], namespaces=True))
    text = console.export_text()
    assert "sha256:cdcdcdcdcdcd" in text and "sha256:cdcdcdcdcdcdc" not in text
    assert "hub:gpt2@main" in text and "source:" not in text
    row = next(line for line in text.splitlines() if line.startswith("ml") and "story" in line)
    assert row.split()[:3] == ["ml", "story", "Running"] and "40/200" in row and "1m35s" in row
