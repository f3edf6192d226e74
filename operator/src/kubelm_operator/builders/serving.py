"""A LanguageModel's children: the serving configuration, the connection Secret, the worker
Deployment, and the gateway's Deployment and Service."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from kubelm_contract import env, queues, training
from kubelm_contract.settings import dump
from kubelm_contract.volumes import DEFAULT_VOLUMES_ROOT, claim_of

from ..hashing import digest
from ..naming import child_name
from ..spec import LanguageModelSpec
from .common import Owner, container_security_context, labels, metadata, pod_security_context, secret_data

WORKER, GATEWAY = "serving-worker", "serving-gateway"
SERVE_FILE, GATEWAY_FILE = "serve.json", "gateway.json"
HEALTH_PORT, GATEWAY_PORT = 8081, 8080
AUTH_DIR = "/etc/kubelm/auth"
DRAIN_SECONDS = 120
"""SIGTERM drains the running batch: time enough for a batch of long completions to finish."""
AMQP_URL_KEY, REDIS_URL_KEY, RABBITMQ_API_URL_KEY = "amqp-url", "redis-url", "rabbitmq-api-url"
MEMCACHED_URL_KEY = "memcached-url"
KEDA_POLLING_SECONDS = 5
KEDA_PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
SELECTOR_LABELS = ("app.kubernetes.io/instance", "app.kubernetes.io/component", "kubelm.io/languagemodel")
"""Labels that pick one model's workers or gateway; immutable in a Deployment's selector, so never more."""


@dataclass(frozen=True)
class ServingNames:
    config_map: str
    secret: str
    worker: str
    gateway: str

    @property
    def service(self) -> str:
        return self.gateway


def names(owner: Owner) -> ServingNames:
    return ServingNames(
        config_map=child_name(owner.name, "serve"),
        secret=child_name(owner.name, "serve-env"),
        worker=child_name(owner.name, "worker"),
        gateway=child_name(owner.name, "gateway", start_with_letter=True),
    )


def endpoint(owner: Owner) -> str:
    """Where clients send OpenAI-style requests, from inside the cluster."""
    return f"http://{names(owner).service}.{owner.namespace}.svc:{GATEWAY_PORT}/v1"


def serve_config(owner: Owner, spec: LanguageModelSpec, model_source: dict[str, Any]) -> dict[str, Any]:
    """The runtime's worker configuration (runtime-contract.md) for this model."""
    return {
        "name": owner.name,
        "namespace": owner.namespace,
        "model": {**model_source, **({"tokenizer": spec.model.tokenizer} if spec.model.tokenizer else {})},
        "generation": dump(spec.generation),
        "limits": dump(spec.limits),
        "batching": dump(spec.batching),
        "queue": dump(spec.queue),
        "cache": dump(spec.cache),
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "cacheDir": training.CACHE_DIR,
        "healthPort": HEALTH_PORT,
    }


def gateway_config(owner: Owner, spec: LanguageModelSpec) -> dict[str, Any]:
    config: dict[str, Any] = {"namespace": owner.namespace, "models": [owner.name], "port": GATEWAY_PORT}
    if spec.gateway.auth_secret_ref is not None:
        config["authTokenFile"] = posixpath.join(AUTH_DIR, spec.gateway.auth_secret_ref.key)
    return config


def config_map(owner: Owner, serve: dict[str, Any], gateway: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(owner, names(owner).config_map, WORKER),
            "data": {SERVE_FILE: json.dumps(serve, indent=2), GATEWAY_FILE: json.dumps(gateway, indent=2)}}


def connection_secret(owner: Owner, amqp_url: str, redis_url: str | None,
                      rabbitmq_api_url: str | None = None, memcached_url: str | None = None) -> dict[str, Any]:
    """The URLs the pods need, the management API's for KEDA's RabbitMQ scaler when it is used, and
    Memcached's for a response cache kept there."""
    data = {AMQP_URL_KEY: amqp_url, **({REDIS_URL_KEY: redis_url} if redis_url else {}),
            **({RABBITMQ_API_URL_KEY: rabbitmq_api_url} if rabbitmq_api_url else {}),
            **({MEMCACHED_URL_KEY: memcached_url} if memcached_url else {})}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata(owner, names(owner).secret, WORKER),
            "type": "Opaque", "data": secret_data(data)}


def _connection_env(owner: Owner, with_redis: bool, with_memcached: bool = False) -> list[dict[str, Any]]:
    secret = names(owner).secret
    variables = [{"name": env.AMQP_URL, "valueFrom": {"secretKeyRef": {"name": secret, "key": AMQP_URL_KEY}}}]
    if with_redis:
        variables.append({"name": env.REDIS_URL, "valueFrom": {"secretKeyRef": {"name": secret,
                                                                                 "key": REDIS_URL_KEY}}})
    if with_memcached:
        variables.append({"name": env.MEMCACHED_URL, "valueFrom": {"secretKeyRef": {"name": secret,
                                                                                     "key": MEMCACHED_URL_KEY}}})
    return variables


def _base_env(config_file: str) -> list[dict[str, Any]]:
    return [
        {"name": env.CONFIG_FILE, "value": posixpath.join(training.CONFIG_DIR, config_file)},
        {"name": env.VOLUMES_ROOT, "value": DEFAULT_VOLUMES_ROOT},
        # The root filesystem is read-only: everything that writes under HOME writes to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": posixpath.join(training.CACHE_DIR, "hf")},
    ]


def _model_claims(spec: LanguageModelSpec, model_source: dict[str, Any]) -> list[str]:
    uris = [model_source.get("uri"), spec.model.tokenizer]
    return sorted({claim for uri in uris if uri and (claim := claim_of(uri))})


def _pod(owner: Owner, component: str, container: dict[str, Any], volumes: list[dict[str, Any]],
         spec: LanguageModelSpec, config_digest: str, grace: int) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": grace,
        "containers": [container],
        "volumes": volumes,
    }
    if component == WORKER and spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if component == WORKER and spec.tolerations:
        pod_spec["tolerations"] = [dump(t) for t in spec.tolerations]
    return {"metadata": {"labels": labels(owner, component),
                         # A changed configuration rolls the pods.
                         "annotations": {"kubelm.io/config-digest": config_digest}},
            "spec": pod_spec}


def selector_of(owner: Owner, component: str) -> dict[str, str]:
    """The labels that pick this model's pods of `component` (its workers or its gateway)."""
    return {k: v for k, v in labels(owner, component).items() if k in SELECTOR_LABELS}


def _deployment(owner: Owner, name: str, component: str, template: dict[str, Any],
                replicas: int | None, max_unavailable: int = 0) -> dict[str, Any]:
    selector = {k: v for k, v in template["metadata"]["labels"].items() if k in SELECTOR_LABELS}
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": 1}},
        "template": template,
    }
    if replicas is not None:
        deployment_spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(owner, name, component),
            "spec": deployment_spec}


def worker_replicas(spec: LanguageModelSpec, current: int | None) -> int | None:
    """The workers' replicas as applied: the count set by hand (engine none); for the builtin autoscaler the
    count it decided last (`current`), or minReplicas for a new Deployment, which would otherwise start one
    pod (a GPU scheduled for nothing when minReplicas is 0); left to KEDA's HPA with engine keda."""
    engine = spec.autoscaling.engine
    if engine == "none" or (engine == "builtin" and current is None):
        return 0 if spec.suspend else spec.autoscaling.min_replicas
    return current if engine == "builtin" else None


def worker_deployment(owner: Owner, spec: LanguageModelSpec, image: str, model_source: dict[str, Any],
                      config_digest: str, with_redis: bool, with_memcached: bool = False,
                      current_replicas: int | None = None) -> dict[str, Any]:
    """Inference workers on the model's queue (replicas: `worker_replicas`)."""
    resources: dict[str, str] = {"cpu": str(spec.resources.cpu), "memory": str(spec.resources.memory)}
    if spec.resources.gpus > 0:
        resources["nvidia.com/gpu"] = str(spec.resources.gpus)
    n = names(owner)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": n.config_map}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": training.CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": training.CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    for index, claim in enumerate(_model_claims(spec, model_source)):
        volumes.append({"name": f"claim-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"claim-{index}", "mountPath": posixpath.join(DEFAULT_VOLUMES_ROOT, claim),
                       "readOnly": True})
    container = {
        "name": "worker",
        "image": spec.image or image,
        "args": ["serve"],
        "env": _base_env(SERVE_FILE) + _connection_env(owner, with_redis, with_memcached),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "resources": {"requests": resources, "limits": dict(resources)},
        "volumeMounts": mounts,
        # Liveness holds while the model loads; readiness waits until the worker consumes its queue.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "health"}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    template = _pod(owner, WORKER, container, volumes, spec, config_digest, DRAIN_SECONDS)
    # Never below the ready count during a CPU rollout: a new pod must be ready before an old one drains. A GPU
    # pool is often full, so there the old pod goes first (one at a time) or the rollout never starts.
    return _deployment(owner, n.worker, WORKER, template, worker_replicas(spec, current_replicas),
                       max_unavailable=1 if spec.resources.gpus > 0 else 0)


def gateway_deployment(owner: Owner, spec: LanguageModelSpec, image: str, config_digest: str,
                       with_redis: bool, with_memcached: bool = False) -> dict[str, Any]:
    n = names(owner)
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": n.config_map}},
                                     {"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": training.CONFIG_DIR, "readOnly": True},
                                    {"name": "tmp", "mountPath": "/tmp"}]
    if spec.gateway.auth_secret_ref is not None:
        volumes.append({"name": "auth", "secret": {"secretName": spec.gateway.auth_secret_ref.name}})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    container = {
        "name": "gateway",
        "image": spec.image or image,
        "args": ["gateway"],
        "env": _base_env(GATEWAY_FILE) + _connection_env(owner, with_redis, with_memcached),
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": container_security_context(),
    }
    template = _pod(owner, GATEWAY, container, volumes, spec, config_digest, 30)
    return _deployment(owner, n.gateway, GATEWAY, template, 0 if spec.suspend else spec.gateway.replicas)


def gateway_service(owner: Owner, spec: LanguageModelSpec) -> dict[str, Any]:
    n = names(owner)
    selector = selector_of(owner, GATEWAY)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(owner, n.service, GATEWAY),
            "spec": {"type": spec.gateway.service_type, "selector": selector,
                     "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}]}}


def keda_trigger_authentication(owner: Owner) -> dict[str, Any]:
    """Hands KEDA the management API URL (with its credentials) from the model's Secret."""
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
            "metadata": metadata(owner, child_name(owner.name, "keda"), WORKER),
            "spec": {"secretTargetRef": [{"parameter": "host", "name": names(owner).secret,
                                          "key": RABBITMQ_API_URL_KEY}]}}


def keda_scaled_object(owner: Owner, spec: LanguageModelSpec, vhost: str) -> dict[str, Any]:
    """KEDA scales the workers instead of the operator: the same queue length (ready and unacknowledged,
    which the scaler's HTTP mode counts), activation and bounds, and the HPA behavior windows."""
    scaling = spec.autoscaling
    # Suspended: KEDA's own pause, which scales the target to the given count and stops scaling it; a
    # minimum and maximum of 0 would be refused.
    paused = {"annotations": {KEDA_PAUSED_REPLICAS: "0"}} if spec.suspend else {}
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": metadata(owner, names(owner).worker, WORKER, **paused),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names(owner).worker},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": KEDA_POLLING_SECONDS,
            "cooldownPeriod": scaling.scale_down_stabilization_seconds,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": scaling.scale_up_stabilization_seconds},
                "scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds}}}},
            "triggers": [{
                "type": "rabbitmq",
                "metadata": {"protocol": "http", "mode": "QueueLength", "vhostName": vhost,
                             "queueName": queues.request_queue(owner.namespace, owner.name),
                             "value": str(scaling.target_queue_length_per_replica),
                             "activationValue": str(scaling.activation_queue_length)},
                "authenticationRef": {"name": child_name(owner.name, "keda")},
            }],
        },
    }


def owned_kinds(owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child a spec may or may not ask for: what is not rendered is pruned.
    The configuration, Secret and workers are always rendered."""
    n = names(owner)
    return [("apps/v1", "Deployment", n.gateway), ("v1", "Service", n.service),
            ("keda.sh/v1alpha1", "ScaledObject", n.worker),
            ("keda.sh/v1alpha1", "TriggerAuthentication", child_name(owner.name, "keda"))]


def children(owner: Owner, spec: LanguageModelSpec, *, image: str, model_source: dict[str, Any], amqp_url: str,
             redis_url: str | None, rabbitmq_api_url: str | None = None,
             memcached_url: str | None = None, worker_replicas: int | None = None) -> list[dict[str, Any]]:
    """Every child, in the order they must exist: what the pods mount before the Deployments."""
    serve, gateway = serve_config(owner, spec, model_source), gateway_config(owner, spec)
    keda = spec.autoscaling.engine == "keda"
    memcached = memcached_url if spec.cache.responses.backend == "memcached" else None
    objects = [config_map(owner, serve, gateway),
               connection_secret(owner, amqp_url, redis_url, rabbitmq_api_url if keda else None, memcached),
               worker_deployment(owner, spec, image, model_source, digest(serve), bool(redis_url), bool(memcached),
                                 worker_replicas)]
    if spec.gateway.enabled:
        objects += [gateway_deployment(owner, spec, image, digest(gateway), bool(redis_url), bool(memcached)),
                    gateway_service(owner, spec)]
    if keda:
        vhost = unquote(urlsplit(amqp_url).path[1:]) or "/"
        objects += [keda_trigger_authentication(owner), keda_scaled_object(owner, spec, vhost)]
    return objects
