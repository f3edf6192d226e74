"""The operator process reconciling LanguageModels on the real control plane (shipped RBAC), RabbitMQ
and Redis: queues with the contract's arguments, the registry entry, workers and gateway, the builtin
autoscaler, a queue argument RabbitMQ cannot change, and both deletion policies."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from base64 import b64encode
from typing import Any

import pika
import pytest
from kubernetes.client.rest import ApiException

from kubelm_contract import keys, queues
from kubelm_contract.queues import QueueSpec
from support import ClusterEnv, eventually

from .conftest import GROUP, VERSION, Api, OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.services]


def _management(cluster: ClusterEnv, path: str) -> Any:
    parts = urllib.parse.urlsplit(cluster.rabbitmq_api_url)
    request = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}{path}", headers={
        "Authorization": "Basic " + b64encode(f"{parts.username}:{parts.password}".encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _queue(cluster: ClusterEnv, name: str) -> dict[str, Any] | None:
    found = _management(cluster, f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}")
    return dict(found) if found is not None else None


def _create_lm(api: Api, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return api.custom.create_namespaced_custom_object(  # type: ignore[no-any-return]
        GROUP, VERSION, namespace, "languagemodels",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "metadata": {"name": name}, "spec": spec})


def _lm_status(api: Api, namespace: str, name: str) -> dict[str, Any]:
    return dict(api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", name)
                .get("status") or {})


def _condition(found: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in found.get("conditions", []) if c["type"] == type_), {})


def _replicas(api: Api, namespace: str, name: str) -> int | None:
    """The Deployment's replicas; None while it does not exist yet."""
    try:
        return int(api.apps.read_namespaced_deployment(name, namespace).spec.replicas)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _publish(cluster: ClusterEnv, queue: str, count: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = connection.channel()
    for i in range(count):
        channel.basic_publish("", queue, json.dumps({"v": 1, "id": f"r{i}", "prompt": "hi"}).encode())
    connection.close()


SCALING = {"minReplicas": 0, "maxReplicas": 4, "targetQueueLengthPerReplica": 2, "activationQueueLength": 0,
           "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 2}


def test_languagemodel_gets_queues_registry_workers_and_scales_with_the_backlog(
        running_operator: OperatorProcess, api: Api, cluster: ClusterEnv, namespace: str, redis_client: Any) -> None:
    name = "gpt2"
    lm = _create_lm(api, namespace, name, {"model": {"hub": {"id": "openai-community/gpt2"}},
                                           "resources": {"cpu": "10m", "memory": "32Mi"},
                                           "queue": {"maxLength": 100, "deliveryLimit": 2},
                                           "autoscaling": SCALING})
    queue = queues.request_queue(namespace, name)
    eventually(lambda: _queue(cluster, queue) is not None, timeout=120, what="request queue declared")
    declared = _queue(cluster, queue)
    assert declared is not None and declared["arguments"] == queues.request_queue_arguments(
        namespace, name, QueueSpec(max_length=100, delivery_limit=2))
    assert _queue(cluster, queues.dead_letter_queue(namespace, name)) is not None

    entry = json.loads(redis_client.hget(keys.MODEL_REGISTRY, f"{namespace}/{name}"))
    assert (entry["queue"], entry["source"], entry["digest"]) == (
        queue, "hub:openai-community/gpt2@main", "source:hub:openai-community/gpt2@main")
    for kind, child in (("worker", api.apps.read_namespaced_deployment("gpt2-worker", namespace)),
                        ("gateway", api.apps.read_namespaced_deployment("gpt2-gateway", namespace)),
                        ("service", api.core.read_namespaced_service("gpt2-gateway", namespace))):
        assert child.metadata.owner_references[0].uid == lm["metadata"]["uid"], kind

    # No backlog and minReplicas 0: the workers go to zero after the scale-down window. Ready waits for the
    # gateway behind the endpoint: its pod made ready here as a kubelet would report it.
    eventually(lambda: _replicas(api, namespace, "gpt2-worker") == 0, timeout=120, what="scaled to zero")
    eventually(lambda: _condition(_lm_status(api, namespace, name), "Ready").get("reason") == "GatewayNotReady",
               timeout=120, what="not Ready while the gateway is not")
    assert _lm_status(api, namespace, name)["phase"] == "Loading"
    selector = "app.kubernetes.io/component=serving-gateway,kubelm.io/languagemodel=gpt2"
    eventually(lambda: bool(api.core.list_namespaced_pod(namespace, label_selector=selector).items), timeout=120,
               what="a gateway pod")
    api.run_pod(namespace, api.core.list_namespaced_pod(namespace, label_selector=selector).items[0].metadata.name)
    eventually(lambda: _lm_status(api, namespace, name).get("phase") == "Ready", timeout=120,
               what="Ready once the gateway is")
    status = _lm_status(api, namespace, name)
    assert status["endpoint"] == f"http://gpt2-gateway.{namespace}.svc:8080/v1"
    assert _condition(status, "QueueReady")["status"] == "True"
    assert _condition(status, "Ready")["reason"] == "ScaledToZero"

    _publish(cluster, queue, 7)
    eventually(lambda: _replicas(api, namespace, "gpt2-worker") == 4, timeout=120,
               what="ceil(7 / 2) = 4 workers for the backlog")
    eventually(lambda: any(h["to"] == 4 for h in _lm_status(api, namespace, name).get("scalingHistory", [])),
               timeout=90, what="the decision recorded in status")
    record = next(h for h in _lm_status(api, namespace, name)["scalingHistory"] if h["to"] == 4)
    assert record["reason"].startswith("backlog 7 (ready 7, unacked 0) at 2 per worker wants 4")
    eventually(lambda: (_lm_status(api, namespace, name).get("queue") or {}).get("depth") == 7, timeout=90,
               what="queue depth in status")
    eventually(lambda: any(e.reason == "Scaled" for e in api.events(namespace, name)), timeout=90,
               what="a Scaled Event")

    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    connection.channel().queue_purge(queue)
    connection.close()
    eventually(lambda: _replicas(api, namespace, "gpt2-worker") == 0, timeout=120,
               what="back to zero after the window once the backlog is gone")


def test_a_queue_argument_rabbitmq_cannot_change_is_a_condition_naming_the_field(
        running_operator: OperatorProcess, api: Api, cluster: ClusterEnv, namespace: str) -> None:
    name = "clash"
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    queues.declare_model_queues(connection.channel(), namespace, name, QueueSpec(max_length=5))
    connection.close()
    _create_lm(api, namespace, name, {"model": {"hub": {"id": "gpt2"}}, "queue": {"maxLength": 10},
                                      "resources": {"cpu": "10m", "memory": "32Mi"}})

    def conflicted() -> bool:
        return _condition(_lm_status(api, namespace, name), "QueueReady").get("reason") == "QueueArgumentConflict"
    eventually(conflicted, timeout=120, what="QueueReady False with QueueArgumentConflict")
    found = _lm_status(api, namespace, name)
    assert _condition(found, "QueueReady")["message"].startswith("spec.queue.maxLength:")
    assert _condition(found, "Stalled")["status"] == "True" and found["phase"] == "Degraded"
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    connection.channel().queue_delete(queues.request_queue(namespace, name))
    connection.close()


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_deletion_policy(policy: str, running_operator: OperatorProcess, api: Api, cluster: ClusterEnv,
                         namespace: str, redis_client: Any) -> None:
    name = f"gone-{policy.lower()}"
    _create_lm(api, namespace, name, {"model": {"hub": {"id": "gpt2"}}, "queue": {"deletionPolicy": policy},
                                      "cache": {"deletionPolicy": policy},
                                      "resources": {"cpu": "10m", "memory": "32Mi"}})
    queue = queues.request_queue(namespace, name)
    eventually(lambda: _queue(cluster, queue) is not None and
               redis_client.hexists(keys.MODEL_REGISTRY, f"{namespace}/{name}"), timeout=120,
               what="queue and registry entry")
    redis_client.set(keys.response(f"{namespace}/{name}", "abc"), "cached")
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", name)

    def gone() -> bool:
        try:
            api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", name)
            return False
        except ApiException as e:
            return e.status == 404
    eventually(gone, timeout=120, what="LanguageModel removed after its finalizer")
    kept = policy == "Retain"
    assert (_queue(cluster, queue) is not None) == kept
    assert bool(redis_client.hexists(keys.MODEL_REGISTRY, f"{namespace}/{name}")) == kept
    assert bool(redis_client.exists(keys.response(f"{namespace}/{name}", "abc"))) == kept
    if kept:
        connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
        connection.channel().queue_delete(queue)
        connection.close()
        redis_client.hdel(keys.MODEL_REGISTRY, f"{namespace}/{name}")
        redis_client.delete(keys.response(f"{namespace}/{name}", "abc"))


def _succeed(api: Api, namespace: str, job: str, redis_client: Any, version: int, digest: str) -> None:
    """Drives a TrainingJob to success as its trainer and kubelet would."""
    eventually(lambda: bool(api.pods(namespace, f"{job}-train")), timeout=120, what=f"{job}'s pod")
    pods = api.pods(namespace, f"{job}-train")
    redis_client.set(keys.progress(f"{namespace}/{job}"), json.dumps({"phase": "Succeeded", "artifact": {
        "uri": f"artifact://{namespace}/{job}@{version}", "version": version, "digest": digest}}))
    api.finish_pod(namespace, pods[0].metadata.name, exit_code=0, reason="Completed")
    api.wait_status(namespace, job, lambda s: s.get("phase") == "Succeeded", "job succeeded")


def test_a_model_from_training_waits_serves_the_artifact_and_rolls_to_a_newer_one(
        running_operator: OperatorProcess, api: Api, namespace: str, redis_client: Any) -> None:
    job_spec = {"baseModel": {"hub": {"id": "gpt2"}}, "dataset": {"train": "/d/train.txt"},
                "resources": {"cpu": "10m", "memory": "32Mi"}, "backoffLimit": 0}
    api.create_tj(namespace, "first", job_spec)
    _create_lm(api, namespace, "tuned", {"model": {"trainingJobRef": {"name": "first"}},
                                         "resources": {"cpu": "10m", "memory": "32Mi"},
                                         "autoscaling": {"engine": "none", "minReplicas": 1}})
    eventually(lambda: _condition(_lm_status(api, namespace, "tuned"), "ModelReady").get("reason") ==
               "WaitingForTrainingJob", timeout=120, what="ModelReady False while the job trains")
    assert _lm_status(api, namespace, "tuned")["phase"] == "Pending"

    _succeed(api, namespace, "first", redis_client, 1, "sha256:" + "1" * 64)
    eventually(lambda: (_lm_status(api, namespace, "tuned").get("model") or {}).get("revision") == "v1",
               timeout=120, what="serving the first artifact")
    assert _lm_status(api, namespace, "tuned")["model"] == {
        "source": f"artifact://{namespace}/first@1", "revision": "v1", "digest": "sha256:" + "1" * 64}
    config = json.loads(api.core.read_namespaced_config_map("tuned-serve", namespace).data["serve.json"])
    assert config["model"] == {"artifact": f"artifact://{namespace}/first@1"}
    entry = json.loads(redis_client.hget(keys.MODEL_REGISTRY, f"{namespace}/tuned"))
    assert entry["digest"] == "sha256:" + "1" * 64  # the artifact's, which the workers also compute
    template = api.apps.read_namespaced_deployment("tuned-worker", namespace).spec.template
    first_digest = template.metadata.annotations["kubelm.io/config-digest"]

    # A replacement job: pointing the model at it rolls the workers to its artifact.
    api.create_tj(namespace, "second", job_spec)
    _succeed(api, namespace, "second", redis_client, 1, "sha256:" + "2" * 64)
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "tuned",
                                              {"spec": {"model": {"trainingJobRef": {"name": "second"}}}})
    eventually(lambda: (_lm_status(api, namespace, "tuned").get("model") or {}).get("digest") ==
               "sha256:" + "2" * 64, timeout=120, what="serving the second artifact")
    template = api.apps.read_namespaced_deployment("tuned-worker", namespace).spec.template
    assert template.metadata.annotations["kubelm.io/config-digest"] != first_digest  # the pods roll
    revisions = _lm_status(api, namespace, "tuned")["revisions"]
    assert [(r["source"], r["digest"]) for r in revisions] == [
        (f"artifact://{namespace}/first@1", "sha256:" + "1" * 64)]

    # Going back: the model set to the earlier artifact, as the revision history names it.
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "tuned", {"spec": {
        "model": {"trainingJobRef": None, "uri": revisions[-1]["source"]}}})
    eventually(lambda: (_lm_status(api, namespace, "tuned").get("model") or {}).get("source") ==
               f"artifact://{namespace}/first@1", timeout=120, what="serving the first artifact again")
    config = json.loads(api.core.read_namespaced_config_map("tuned-serve", namespace).data["serve.json"])
    assert config["model"] == {"artifact": f"artifact://{namespace}/first@1"}


def test_a_worker_whose_model_cannot_load_is_reported_not_looped(
        running_operator: OperatorProcess, api: Api, namespace: str) -> None:
    name = "broken"
    _create_lm(api, namespace, name, {"model": {"uri": "/models/broken"}, "resources": {"cpu": "10m", "memory": "32Mi"},
                                      "autoscaling": {"engine": "none", "minReplicas": 1}})
    selector = "app.kubernetes.io/component=serving-worker,kubelm.io/languagemodel=broken"
    eventually(lambda: bool(api.core.list_namespaced_pod(namespace, label_selector=selector).items), timeout=120,
               what="a worker pod")
    pod = api.core.list_namespaced_pod(namespace, label_selector=selector).items[0].metadata.name
    reason = "model /models/broken corrupt: SafetensorError: Error while deserializing header: incomplete metadata"
    # What a kubelet reports for a worker that exited 1 with the runtime's one-line reason, restarting.
    api.core.patch_namespaced_pod_status(pod, namespace, {"status": {"phase": "Running", "containerStatuses": [{
        "name": "worker", "image": "kubelm/runtime:test", "imageID": "", "ready": False, "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": reason,
                                     "startedAt": "2026-11-30T10:00:00Z", "finishedAt": "2026-11-30T10:00:05Z"}}}]}})
    eventually(lambda: _condition(_lm_status(api, namespace, name), "ModelReady").get("reason") == "ModelLoadFailed",
               timeout=120, what="ModelReady False with the worker's reason")
    found = _lm_status(api, namespace, name)
    assert _condition(found, "ModelReady")["message"] == f"pod {pod}: {reason}"
    assert found["phase"] == "Degraded" and _condition(found, "Stalled")["status"] == "True"
    eventually(lambda: any(e.reason == "Degraded" and "SafetensorError" in e.message
                           for e in api.events(namespace, name)), timeout=90, what="a Warning Event with the reason")


def test_keda_engine_hands_scaling_to_a_scaled_object(running_operator: OperatorProcess, api: Api, namespace: str,
                                                      keda_crds: None) -> None:
    name = "kedamodel"
    lm = _create_lm(api, namespace, name, {"model": {"hub": {"id": "gpt2"}}, "resources": {"cpu": "10m",
                                                                                         "memory": "32Mi"},
                                           "autoscaling": {"engine": "keda", "minReplicas": 0, "maxReplicas": 3,
                                                           "targetQueueLengthPerReplica": 5}})

    def scaled_object() -> dict[str, Any] | None:
        try:
            return dict(api.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects",
                                                                f"{name}-worker"))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
    eventually(lambda: scaled_object() is not None, timeout=120, what="a ScaledObject the KEDA CRD accepted")
    found = scaled_object()
    assert found is not None and found["metadata"]["ownerReferences"][0]["uid"] == lm["metadata"]["uid"]
    trigger = found["spec"]["triggers"][0]
    assert trigger["metadata"]["queueName"] == queues.request_queue(namespace, name)
    assert (trigger["metadata"]["value"], found["spec"]["maxReplicaCount"]) == ("5", 3)
    api.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "triggerauthentications",
                                            f"{name}-keda")
    secret = api.core.read_namespaced_secret(f"{name}-serve-env", namespace)
    assert "rabbitmq-api-url" in secret.data
    # The operator leaves the replica count to KEDA's HPA: no scaling decision of its own.
    assert "scalingHistory" not in _lm_status(api, namespace, name)


def test_suspend_scales_to_zero_and_keeps_the_queue(running_operator: OperatorProcess, api: Api,
                                                     cluster: ClusterEnv, namespace: str) -> None:
    name = "pausable"
    _create_lm(api, namespace, name, {"model": {"hub": {"id": "gpt2"}}, "resources": {"cpu": "10m", "memory": "32Mi"},
                                      "autoscaling": {"minReplicas": 2, "maxReplicas": 3}})
    eventually(lambda: _replicas(api, namespace, f"{name}-worker") == 2, timeout=120, what="minReplicas workers")
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", name,
                                              {"spec": {"suspend": True}})
    eventually(lambda: _replicas(api, namespace, f"{name}-worker") == 0, timeout=120, what="no workers")
    eventually(lambda: _lm_status(api, namespace, name).get("phase") == "Suspended", timeout=120,
               what="phase Suspended")
    assert _queue(cluster, queues.request_queue(namespace, name)) is not None
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", name,
                                              {"spec": {"suspend": False}})
    eventually(lambda: _replicas(api, namespace, f"{name}-worker") == 2, timeout=120, what="workers back")
