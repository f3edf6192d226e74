"""Golden tests of the LanguageModel builders, the runtime reading what they render, and the API server
accepting them (server-side dry-run)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils

from kubelm_operator.builders import serving as build
from kubelm_operator.builders.common import Owner
from kubelm_operator.spec import parse_languagemodel
from kubelm_runtime.config import load_config
from kubelm_runtime.serve.settings import GatewayConfig, ServeConfig
from support import REPO

IMAGE = "kubelm/runtime:0.1.0"
HUB = {"hub": {"id": "openai-community/gpt2", "revision": "main"}}
OWNER = Owner("LanguageModel", "team-a", "gpt2", "uid-2")
SAMPLES = sorted((REPO / "manifests" / "samples").glob("languagemodel-*.yaml"))


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubelm", "app.kubernetes.io/instance": "gpt2",
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "kubelm-operator",
            "kubelm.io/languagemodel": "gpt2"}


def _meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": "team-a", "labels": _labels(component), "ownerReferences": [
        {"apiVersion": "kubelm.io/v1alpha1", "kind": "LanguageModel", "name": "gpt2", "uid": "uid-2",
         "controller": True, "blockOwnerDeletion": True}]}


RESTRICTED = {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}


def _env(config_file: str) -> list[dict[str, Any]]:
    return [
        {"name": "KUBELM_CONFIG", "value": f"/etc/kubelm/{config_file}"},
        {"name": "KUBELM_VOLUMES_ROOT", "value": "/mnt/kubelm/volumes"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/var/cache/kubelm/hf"},
        {"name": "KUBELM_AMQP_URL", "valueFrom": {"secretKeyRef": {"name": "gpt2-serve-env", "key": "amqp-url"}}},
        {"name": "KUBELM_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "gpt2-serve-env", "key": "redis-url"}}},
    ]


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    assert "stringData" not in secret  # stringData keys the operator stops sending would never go
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def _children(spec: dict[str, Any], source: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    objects = build.children(OWNER, parse_languagemodel(spec), image=IMAGE, model_source=source or HUB,
                             amqp_url="amqp://u:p@rabbitmq:5672/%2F", redis_url="redis://redis:6379/0")
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def test_cpu_sample_gives_this_worker_deployment() -> None:
    spec = yaml.safe_load((REPO / "manifests/samples/languagemodel-cpu.yaml").read_text())["spec"]
    children = _children(spec)
    assert sorted(children) == ["ConfigMap/gpt2-serve", "Deployment/gpt2-gateway", "Deployment/gpt2-worker",
                                "Secret/gpt2-serve-env", "Service/gpt2-gateway"]
    worker_labels = _labels("serving-worker")
    assert children["Deployment/gpt2-worker"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("gpt2-worker", "serving-worker"),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": "gpt2",
                                         "app.kubernetes.io/component": "serving-worker",
                                         "kubelm.io/languagemodel": "gpt2"}},
            "replicas": 1,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": worker_labels, "annotations": {"kubelm.io/config-digest": "efcb260377b44220"}},
                "spec": {
                    "automountServiceAccountToken": False, "enableServiceLinks": False,
                    "securityContext": POD_SECURITY, "terminationGracePeriodSeconds": 120,
                    "containers": [{
                        "name": "worker", "image": IMAGE, "args": ["serve"], "env": _env("serve.json"),
                        "ports": [{"name": "health", "containerPort": 8081}],
                        "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                      "limits": {"cpu": "2", "memory": "4Gi"}},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/kubelm", "readOnly": True},
                                         {"name": "cache", "mountPath": "/var/cache/kubelm"},
                                         {"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "shm", "mountPath": "/dev/shm"}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/livez", "port": "health"}, "periodSeconds": 20,
                                          "timeoutSeconds": 5, "failureThreshold": 3},
                        "securityContext": RESTRICTED,
                        "terminationMessagePolicy": "FallbackToLogsOnError"}],
                    "volumes": [{"name": "config", "configMap": {"name": "gpt2-serve"}},
                                {"name": "cache", "emptyDir": {}},
                                {"name": "tmp", "emptyDir": {}},
                                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]}}}}
    assert _decoded(children["Secret/gpt2-serve-env"]) == {"amqp-url": "amqp://u:p@rabbitmq:5672/%2F",
                                                               "redis-url": "redis://redis:6379/0"}


def test_gateway_with_a_bearer_token_and_its_service() -> None:
    children = _children({"model": {"uri": "pvc://models/gpt2"},
                          "gateway": {"replicas": 2, "serviceType": "LoadBalancer",
                                      "authSecretRef": {"name": "gpt2-clients"}}},
                         source={"uri": "pvc://models/gpt2"})
    gateway = children["Deployment/gpt2-gateway"]
    assert gateway["spec"]["replicas"] == 2
    pod = gateway["spec"]["template"]["spec"]
    assert {"name": "auth", "secret": {"secretName": "gpt2-clients"}} in pod["volumes"]
    container = pod["containers"][0]
    assert container["args"] == ["gateway"] and container["env"] == _env("gateway.json")
    assert {"name": "auth", "mountPath": "/etc/kubelm/auth", "readOnly": True} in container["volumeMounts"]
    assert json.loads(children["ConfigMap/gpt2-serve"]["data"]["gateway.json"]) == {
        "namespace": "team-a", "models": ["gpt2"], "port": 8080, "authTokenFile": "/etc/kubelm/auth/token"}
    assert children["Service/gpt2-gateway"] == {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta("gpt2-gateway", "serving-gateway"),
        "spec": {"type": "LoadBalancer", "selector": {"app.kubernetes.io/instance": "gpt2",
                                                      "app.kubernetes.io/component": "serving-gateway",
                                                      "kubelm.io/languagemodel": "gpt2"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}}
    worker = children["Deployment/gpt2-worker"]["spec"]["template"]["spec"]
    assert {"name": "claim-0", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in worker["volumes"]
    assert build.endpoint(OWNER) == "http://gpt2-gateway.team-a.svc:8080/v1"


@pytest.mark.parametrize(("autoscaling", "suspend", "current", "replicas"), [
    # A new builtin Deployment starts at minReplicas (not the API's default of 1: a GPU pod for nothing)...
    ({"engine": "builtin", "minReplicas": 0}, False, None, 0), ({"engine": "builtin"}, False, None, 1),
    # ...and later keeps what the autoscaler decided, so an apply never undoes a scaling.
    ({"engine": "builtin", "minReplicas": 0}, False, 3, 3),
    ({"engine": "keda"}, False, None, None), ({"engine": "keda"}, False, 2, None),
    ({"engine": "none", "minReplicas": 3}, False, 1, 3), ({"engine": "none", "minReplicas": 3}, True, None, 0),
])
def test_replicas_as_the_scaler_of_the_engine_has_them(autoscaling: dict[str, Any], suspend: bool,
                                                        current: int | None, replicas: int | None) -> None:
    objects = build.children(OWNER, parse_languagemodel({"model": {"hub": {"id": "gpt2"}}, "autoscaling": autoscaling,
                                                         "suspend": suspend}),
                             image=IMAGE, model_source=HUB, amqp_url="amqp://rabbitmq", redis_url=None,
                             worker_replicas=current)
    worker = next(o for o in objects if o["metadata"]["name"] == "gpt2-worker" and o["kind"] == "Deployment")
    assert worker["spec"].get("replicas") == replicas


def test_suspend_scales_the_gateway_to_zero_and_pauses_keda() -> None:
    children = _children({"model": {"hub": {"id": "gpt2"}}, "suspend": True, "gateway": {"replicas": 2},
                          "autoscaling": {"engine": "keda", "minReplicas": 1, "maxReplicas": 4}})
    assert children["Deployment/gpt2-gateway"]["spec"]["replicas"] == 0
    scaled = children["ScaledObject/gpt2-worker"]
    # KEDA refuses a maximum of 0: its own pause annotation holds the workers at zero instead.
    assert scaled["metadata"]["annotations"] == {"autoscaling.keda.sh/paused-replicas": "0"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    running = _children({"model": {"hub": {"id": "gpt2"}}, "autoscaling": {"engine": "keda"}})
    assert "annotations" not in running["ScaledObject/gpt2-worker"]["metadata"]


def test_gpu_workers_roll_one_pod_down_first() -> None:
    gpu = _children({"model": {"hub": {"id": "gpt2"}}, "resources": {"gpus": 1}})["Deployment/gpt2-worker"]
    assert gpu["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 1}


def test_every_child_a_spec_may_omit_is_a_prune_candidate() -> None:
    """What a spec renders or not (gateway, KEDA) is listed, and nothing that is always rendered."""
    candidates = {f"{kind}/{name}" for _, kind, name in build.owned_kinds(OWNER)}
    everything = set(_children({"model": {"hub": {"id": "gpt2"}}, "autoscaling": {"engine": "keda"}}))
    minimal = set(_children({"model": {"hub": {"id": "gpt2"}}, "gateway": {"enabled": False}}))
    assert candidates == everything - minimal


@pytest.mark.parametrize(("backend", "url", "passed"), [("memcached", "memcached://cache:11211", True),
                                                        ("redis", "memcached://cache:11211", False),
                                                        ("memcached", None, False)])
def test_memcached_reaches_the_pods_of_a_model_whose_cache_lives_there(backend: str, url: str | None,
                                                                       passed: bool) -> None:
    objects = build.children(OWNER, parse_languagemodel({"model": HUB, "cache": {"responses": {"backend": backend}}}),
                             image=IMAGE, model_source=HUB, amqp_url="amqp://u:p@rabbitmq:5672/%2F",
                             redis_url="redis://redis:6379/0", memcached_url=url)
    found = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    assert ("memcached-url" in _decoded(found["Secret/gpt2-serve-env"])) == passed
    variable = {"name": "KUBELM_MEMCACHED_URL", "valueFrom": {"secretKeyRef": {"name": "gpt2-serve-env",
                                                                               "key": "memcached-url"}}}
    for deployment in ("Deployment/gpt2-worker", "Deployment/gpt2-gateway"):
        assert (variable in found[deployment]["spec"]["template"]["spec"]["containers"][0]["env"]) == passed


def test_no_gateway_when_disabled() -> None:
    assert sorted(_children({"model": {"hub": {"id": "gpt2"}}, "gateway": {"enabled": False}})) == [
        "ConfigMap/gpt2-serve", "Deployment/gpt2-worker", "Secret/gpt2-serve-env"]


def test_keda_engine_gives_a_scaled_object_and_its_authentication() -> None:
    objects = build.children(OWNER, parse_languagemodel({
        "model": {"hub": {"id": "gpt2"}},
        "autoscaling": {"engine": "keda", "minReplicas": 0, "maxReplicas": 6, "targetQueueLengthPerReplica": 8,
                        "activationQueueLength": 2, "scaleUpStabilizationSeconds": 15,
                        "scaleDownStabilizationSeconds": 120}}),
        image=IMAGE, model_source=HUB, amqp_url="amqp://u:p@rabbitmq:5672/team%2Fvhost", redis_url=None,
        rabbitmq_api_url="http://u:p@rabbitmq:15672")
    found = {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}
    assert _decoded(found["Secret/gpt2-serve-env"]) == {"amqp-url": "amqp://u:p@rabbitmq:5672/team%2Fvhost",
                                                            "rabbitmq-api-url": "http://u:p@rabbitmq:15672"}
    assert found["TriggerAuthentication/gpt2-keda"] == {
        "apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication", "metadata": _meta("gpt2-keda",
                                                                                             "serving-worker"),
        "spec": {"secretTargetRef": [{"parameter": "host", "name": "gpt2-serve-env", "key": "rabbitmq-api-url"}]}}
    assert found["ScaledObject/gpt2-worker"] == {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta("gpt2-worker", "serving-worker"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt2-worker"},
            "minReplicaCount": 0, "maxReplicaCount": 6, "pollingInterval": 5, "cooldownPeriod": 120,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 15}, "scaleDown": {"stabilizationWindowSeconds": 120}}}},
            "triggers": [{"type": "rabbitmq",
                          "metadata": {"protocol": "http", "mode": "QueueLength", "vhostName": "team/vhost",
                                       "queueName": "kubelm.team-a.gpt2.requests", "value": "8",
                                       "activationValue": "2"},
                          "authenticationRef": {"name": "gpt2-keda"}}]}}
    assert "replicas" not in found["Deployment/gpt2-worker"]["spec"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_runtime_reads_the_rendered_configurations(sample: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(sample.read_text())["spec"]
    spec = parse_languagemodel(raw)
    source = HUB if spec.model.training_job_ref else {k: v for k, v in
                                                      (("hub", raw["model"].get("hub")),
                                                       ("uri", raw["model"].get("uri"))) if v}
    data = _children(raw, source)["ConfigMap/gpt2-serve"]["data"]
    for name in ("serve.json", "gateway.json"):
        (tmp_path / name).write_text(data[name])
    serve = load_config(ServeConfig, tmp_path / "serve.json")
    assert (serve.name, serve.namespace) == ("gpt2", "team-a")
    assert (serve.generation, serve.limits, serve.batching) == (spec.generation, spec.limits, spec.batching)
    assert (serve.queue, serve.cache) == (spec.queue, spec.cache)
    assert serve.device == ("cuda" if spec.resources.gpus else "cpu")
    gateway = load_config(GatewayConfig, tmp_path / "gateway.json")
    assert gateway.models == ["gpt2"] and gateway.namespace == "team-a"


@pytest.mark.cluster
def test_the_api_server_accepts_every_child(api_client: client.ApiClient, namespace: str, keda_crds: None) -> None:
    specs = [yaml.safe_load(sample.read_text())["spec"] for sample in SAMPLES]
    specs.append({"model": {"hub": {"id": "gpt2"}}, "autoscaling": {"engine": "keda"}})
    custom = client.CustomObjectsApi(api_client)
    for raw in specs:
        objects = build.children(Owner("LanguageModel", namespace, "gpt2", "uid-2"), parse_languagemodel(raw),
                                 image=IMAGE, model_source=HUB, amqp_url="amqp://a", redis_url="redis://r",
                                 rabbitmq_api_url="http://u:p@m:15672")
        for obj in objects:
            obj["metadata"].pop("ownerReferences")  # the owner does not exist: only the objects are checked
            if obj["apiVersion"].startswith("keda.sh/"):  # KEDA's own CRDs validate these
                plural = {"ScaledObject": "scaledobjects", "TriggerAuthentication": "triggerauthentications"}
                custom.create_namespaced_custom_object("keda.sh", "v1alpha1", namespace, plural[obj["kind"]], obj,
                                                       dry_run="All")
            else:
                utils.create_from_dict(api_client, obj, namespace=namespace, dry_run="All")
