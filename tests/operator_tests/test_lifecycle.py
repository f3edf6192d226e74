"""What happens to objects on a real cluster, against the operator process on the real control plane:
an object re-created under the same name, children deleted or edited by hand, children the spec no longer
asks for, a rollout, a missing Secret, a TrainingJob gone from under its model, and the order of deletion."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubelm_contract import keys, queues
from support import ClusterEnv, eventually

from .conftest import GROUP, VERSION, Api, OperatorProcess
from .test_languagemodel_operator import _condition, _create_lm, _lm_status, _queue, _succeed

pytestmark = [pytest.mark.cluster, pytest.mark.services]

JOB_SPEC = {"baseModel": {"hub": {"id": "gpt2"}}, "dataset": {"train": "/d/train.txt"},
            "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}
SMALL_LM = {"model": {"hub": {"id": "gpt2"}}, "resources": {"cpu": "10m", "memory": "32Mi"}}
HOLD = "kubelm.io/test-hold"
"""A finalizer the tests put on a child to keep it from going away until they say so."""


def _gone(read: Any) -> bool:
    try:
        read()
        return False
    except ApiException as e:
        if e.status == 404:
            return True
        raise


def _release(patch: Any, name: str, namespace: str) -> None:
    patch(name, namespace, {"metadata": {"finalizers": None}})


def _job_owner(api: Api, namespace: str, name: str) -> str | None:
    try:
        job = api.batch.read_namespaced_job(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return str(job.metadata.owner_references[0].uid) if job.metadata.deletion_timestamp is None else None


def test_a_trainingjob_recreated_under_its_name_waits_out_the_old_job_and_trains(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    first = api.create_tj(namespace, "again", JOB_SPEC)
    _succeed(api, namespace, "again", redis_client, 1, "sha256:" + "1" * 64)
    # The old Job outlives its TrainingJob for a while, as it does while the garbage collector is behind.
    api.batch.patch_namespaced_job("again-train", namespace, {"metadata": {"finalizers": [HOLD]}})
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "again")
    eventually(lambda: _gone(lambda: api.tj(namespace, "again")), timeout=120, what="the first TrainingJob gone")
    redis_client.delete(keys.progress(f"{namespace}/again"))

    second = api.create_tj(namespace, "again", {**JOB_SPEC, "hyperparameters": {"learningRate": 0.001}})
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    waiting = api.wait_status(namespace, "again", lambda s: bool(s.get("conditions")), "a status")
    eventually(lambda: api.condition(namespace, "again", "Ready").get("reason") == "WaitingForPreviousJob",
               timeout=120, what="waiting for the earlier incarnation's Job")
    assert api.status(namespace, "again")["phase"] == "Pending", waiting  # never the old Job's Succeeded

    _release(api.batch.patch_namespaced_job, "again-train", namespace)
    eventually(lambda: _job_owner(api, namespace, "again-train") == second["metadata"]["uid"], timeout=120,
               what="a Job of the new TrainingJob")
    config = json.loads(api.core.read_namespaced_config_map("again-train", namespace).data["train.json"])
    assert config["hyperparameters"]["learningRate"] == 0.001
    api.wait_status(namespace, "again", lambda s: s.get("phase") == "Pending" and
                    (s.get("conditions") or [{}])[0].get("reason") == "WaitingForPods", "waiting for its own pods")


def test_a_job_deleted_by_hand_is_made_again(running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    tj = api.create_tj(namespace, "handdel", JOB_SPEC)
    eventually(lambda: _job_owner(api, namespace, "handdel-train") == tj["metadata"]["uid"], timeout=120,
               what="the Job")
    before = api.batch.read_namespaced_job("handdel-train", namespace).metadata.uid
    api.batch.delete_namespaced_job("handdel-train", namespace, propagation_policy="Background")
    eventually(lambda: _job_owner(api, namespace, "handdel-train") == tj["metadata"]["uid"] and
               api.batch.read_namespaced_job("handdel-train", namespace).metadata.uid != before,
               timeout=120, what="a new Job for the pending TrainingJob")


def test_children_deleted_or_edited_by_hand_come_back(running_operator: OperatorProcess, api: Api,
                                                      namespace: str) -> None:
    lm = _create_lm(api, namespace, "drift", {**SMALL_LM, "autoscaling": {"engine": "none", "minReplicas": 1}})
    uid = lm["metadata"]["uid"]

    def owned(read: Any) -> bool:
        try:
            return str(read().metadata.owner_references[0].uid) == uid
        except ApiException as e:
            if e.status == 404:
                return False
            raise
    readers = {
        "worker": (lambda: api.apps.read_namespaced_deployment("drift-worker", namespace),
                   lambda: api.apps.delete_namespaced_deployment("drift-worker", namespace)),
        "configuration": (lambda: api.core.read_namespaced_config_map("drift-serve", namespace),
                          lambda: api.core.delete_namespaced_config_map("drift-serve", namespace)),
        "gateway service": (lambda: api.core.read_namespaced_service("drift-gateway", namespace),
                            lambda: api.core.delete_namespaced_service("drift-gateway", namespace)),
    }
    for what, (read, delete) in readers.items():
        eventually(lambda r=read: owned(r), timeout=120, what=f"the {what}")
        old_uid = read().metadata.uid
        delete()
        eventually(lambda r=read, o=old_uid: owned(r) and r().metadata.uid != o, timeout=60,
                   what=f"the {what} made again after its deletion")

    # A hand edit of what the operator owns is reverted by the resync (20 s in these tests).
    api.apps.patch_namespaced_deployment("drift-worker", namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": "worker", "image": "example.com/other:1"}]}}}})
    eventually(lambda: api.apps.read_namespaced_deployment("drift-worker", namespace)
               .spec.template.spec.containers[0].image == "kubelm/runtime:test", timeout=120,
               what="the image edited by hand put back")


def test_what_the_spec_no_longer_asks_for_is_removed(running_operator: OperatorProcess, api: Api, namespace: str,
                                                     keda_crds: None) -> None:
    _create_lm(api, namespace, "prune", {**SMALL_LM, "autoscaling": {"engine": "keda", "minReplicas": 0}})

    def exists(read: Any) -> bool:
        return not _gone(read)
    gateway = (lambda: api.apps.read_namespaced_deployment("prune-gateway", namespace),
               lambda: api.core.read_namespaced_service("prune-gateway", namespace))
    scaled = (lambda: api.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects",
                                                              "prune-worker"),
              lambda: api.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", namespace,
                                                              "triggerauthentications", "prune-keda"))
    for read in (*gateway, *scaled):
        eventually(lambda r=read: exists(r), timeout=120, what="every child of the first spec")
    assert "rabbitmq-api-url" in api.core.read_namespaced_secret("prune-serve-env", namespace).data
    # Something of the same name the model does not control is never touched.
    api.custom.create_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects", {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "bystander"},
        "spec": {"scaleTargetRef": {"name": "prune-worker"}, "triggers": [{"type": "cpu", "metricType": "Utilization",
                                                                          "metadata": {"value": "50"}}]}})

    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "prune", {
        "spec": {"gateway": {"enabled": False}, "autoscaling": {"engine": "builtin"}}})
    for read in (*gateway, *scaled):
        eventually(lambda r=read: _gone(r), timeout=120, what="the gateway and KEDA's objects removed")
    assert exists(lambda: api.apps.read_namespaced_deployment("prune-worker", namespace))
    assert exists(lambda: api.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects",
                                                                  "bystander"))
    assert "endpoint" not in _lm_status(api, namespace, "prune")
    # The management API's URL was only for KEDA: the Secret loses that key too.
    eventually(lambda: "rabbitmq-api-url" not in (api.core.read_namespaced_secret("prune-serve-env", namespace)
                                                  .data or {}), timeout=60, what="KEDA's key gone from the Secret")


def _worker_pods(api: Api, namespace: str, name: str) -> list[Any]:
    selector = f"app.kubernetes.io/component=serving-worker,kubelm.io/languagemodel={name}"
    return [p for p in api.core.list_namespaced_pod(namespace, label_selector=selector).items
            if p.metadata.deletion_timestamp is None]


def test_ready_waits_for_the_new_revision(running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    """After a change that rolls the workers, the old pod still answering is not Ready: only the new one is."""
    _create_lm(api, namespace, "roll", {**SMALL_LM, "gateway": {"enabled": False},
                                        "autoscaling": {"engine": "none", "minReplicas": 1}})
    eventually(lambda: len(_worker_pods(api, namespace, "roll")) == 1, timeout=120, what="a worker pod")
    old = _worker_pods(api, namespace, "roll")[0].metadata.name
    api.run_pod(namespace, old)
    eventually(lambda: _lm_status(api, namespace, "roll").get("phase") == "Ready", timeout=120, what="Ready")

    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "roll",
                                              {"spec": {"generation": {"temperature": 0.5}}})
    eventually(lambda: any(p.metadata.name != old for p in _worker_pods(api, namespace, "roll")), timeout=120,
               what="a pod of the new revision")
    eventually(lambda: _condition(_lm_status(api, namespace, "roll"), "Ready").get("reason") == "RollingOut",
               timeout=120, what="not Ready while the old revision answers")
    assert _condition(_lm_status(api, namespace, "roll"), "Ready")["status"] == "False"
    new = next(p.metadata.name for p in _worker_pods(api, namespace, "roll") if p.metadata.name != old)
    api.run_pod(namespace, new)
    eventually(lambda: _lm_status(api, namespace, "roll").get("phase") == "Ready", timeout=120,
               what="Ready once the new revision serves")
    assert [p.metadata.name for p in _worker_pods(api, namespace, "roll")] == [new]


def test_a_missing_gateway_key_secret_is_named(running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    _create_lm(api, namespace, "locked", {**SMALL_LM, "gateway": {"authSecretRef": {"name": "no-such-key"}}})
    eventually(lambda: _condition(_lm_status(api, namespace, "locked"), "Ready").get("reason") ==
               "AuthSecretNotFound", timeout=120, what="the missing Secret said")
    message = _condition(_lm_status(api, namespace, "locked"), "Stalled")["message"]
    assert "Secret 'no-such-key' not found" in message, message
    api.core.create_namespaced_secret(namespace, {"metadata": {"name": "no-such-key"},
                                                  "stringData": {"token": "k"}})
    eventually(lambda: _condition(_lm_status(api, namespace, "locked"), "Ready").get("reason") != "AuthSecretNotFound",
               timeout=120, what="the reason gone once the Secret exists")


def test_a_model_keeps_serving_its_artifact_when_its_trainingjob_is_deleted(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    api.create_tj(namespace, "source", JOB_SPEC)
    _succeed(api, namespace, "source", redis_client, 1, "sha256:" + "3" * 64)
    _create_lm(api, namespace, "pinned", {**SMALL_LM, "model": {"trainingJobRef": {"name": "source"}},
                                          "gateway": {"enabled": False},
                                          "autoscaling": {"engine": "none", "minReplicas": 0}})
    eventually(lambda: _lm_status(api, namespace, "pinned").get("phase") == "Ready", timeout=120, what="Ready")
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "source")
    eventually(lambda: _condition(_lm_status(api, namespace, "pinned"), "ModelReady").get("reason") ==
               "TrainingJobGone", timeout=120, what="a warning that no newer version will come")
    found = _lm_status(api, namespace, "pinned")
    assert found["phase"] == "Ready" and found["model"]["source"] == f"artifact://{namespace}/source@1"
    entry = json.loads(redis_client.hget(keys.MODEL_REGISTRY, f"{namespace}/pinned"))
    assert entry["digest"] == "sha256:" + "3" * 64


def test_deletion_stops_the_workers_before_removing_the_queues(running_operator: OperatorProcess, api: Api,
                                                               cluster: ClusterEnv, namespace: str,
                                                               redis_client: Any) -> None:
    _create_lm(api, namespace, "ordered", {**SMALL_LM, "gateway": {"enabled": False},
                                           "autoscaling": {"engine": "none", "minReplicas": 1}})
    queue = queues.request_queue(namespace, "ordered")
    eventually(lambda: len(_worker_pods(api, namespace, "ordered")) == 1 and _queue(cluster, queue) is not None,
               timeout=120, what="a worker pod and the queue")
    # The worker takes its time to stop (a drain): a finalizer keeps its pod until the test lets it go.
    pod = _worker_pods(api, namespace, "ordered")[0].metadata.name
    api.run_pod(namespace, pod)
    api.core.patch_namespaced_pod(pod, namespace, {"metadata": {"finalizers": [HOLD]}})
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "ordered")
    eventually(lambda: api.apps.read_namespaced_deployment("ordered-worker", namespace).spec.replicas == 0,
               timeout=120, what="the workers scaled to zero first")
    eventually(lambda: api.core.read_namespaced_pod(pod, namespace).metadata.deletion_timestamp is not None,
               timeout=120, what="the worker pod stopping")
    # While it stops, its queue and registry entry stay: it may still answer, and would declare them again.
    assert _queue(cluster, queue) is not None
    assert redis_client.hexists(keys.MODEL_REGISTRY, f"{namespace}/ordered")
    # The drain ends: what the kubelet says when the container stopped (no kubelet here).
    _release(api.core.patch_namespaced_pod, pod, namespace)
    api.core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
    eventually(lambda: _gone(lambda: api.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "languagemodels", "ordered")), timeout=120, what="the model gone")
    assert _queue(cluster, queue) is None
    assert not redis_client.hexists(keys.MODEL_REGISTRY, f"{namespace}/ordered")


def test_a_deletion_that_cannot_clean_up_can_be_let_go(running_operator: OperatorProcess, api: Api,
                                                       namespace: str) -> None:
    """The documented way out when RabbitMQ is gone for good: the annotation lets the finalizer give up."""
    _create_lm(api, namespace, "stuck", {**SMALL_LM, "gateway": {"enabled": False},
                                         "autoscaling": {"engine": "none", "minReplicas": 1}})
    eventually(lambda: len(_worker_pods(api, namespace, "stuck")) == 1, timeout=120, what="a worker pod")
    pod = _worker_pods(api, namespace, "stuck")[0].metadata.name
    api.run_pod(namespace, pod)
    api.core.patch_namespaced_pod(pod, namespace, {"metadata": {"finalizers": [HOLD]}})
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "stuck")
    eventually(lambda: api.core.read_namespaced_pod(pod, namespace).metadata.deletion_timestamp is not None,
               timeout=120, what="the worker pod stopping")
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "stuck", {
        "metadata": {"annotations": {"kubelm.io/skip-cleanup": "true"}}})
    eventually(lambda: _gone(lambda: api.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "languagemodels", "stuck")), timeout=120, what="the model let go")
    assert any(e.reason == "CleanupSkipped" for e in api.events(namespace, "stuck"))
    _release(api.core.patch_namespaced_pod, pod, namespace)
