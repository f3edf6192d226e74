"""A TrainingJob's children: the training configuration, the connection Secret, the
rendezvous Service, the checkpoint claim and the Indexed Job that runs the workers."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from kubelm_contract import env, training
from kubelm_contract.settings import dump
from kubelm_contract.volumes import DEFAULT_VOLUMES_ROOT

from ..hashing import digest
from ..naming import JOB_NAME_MAX, child_name
from ..spec import TrainingJobSpec
from .common import Owner, container_security_context, labels, metadata, pod_security_context, secret_data

COMPONENT = "training"
CONTAINER = "train"
REDIS_URL_KEY = "redis-url"
INVALID_CONFIGURATION_EXIT_CODE = 2
"""kubelm-runtime exits 2 on invalid configuration: retrying such a pod cannot help."""
SHM_SIZE = "1Gi"


@dataclass(frozen=True)
class TrainingNames:
    config_map: str
    secret: str
    service: str
    claim: str
    job: str


def names(owner: Owner) -> TrainingNames:
    return TrainingNames(
        config_map=child_name(owner.name, "train"),
        secret=child_name(owner.name, "train-env"),
        service=child_name(owner.name, "train", start_with_letter=True),
        claim=child_name(owner.name, "checkpoints"),
        job=child_name(owner.name, "train", JOB_NAME_MAX),
    )


def storage_claim(owner: Owner, spec: TrainingJobSpec) -> str | None:
    """The claim holding checkpoints and the model, when the storage is a claim."""
    if spec.storage.type != "pvc":
        return None
    return spec.storage.claim_name or names(owner).claim


def output_dir(owner: Owner, spec: TrainingJobSpec) -> str:
    """On a claim, a folder per job, so one claim can hold several jobs' checkpoints; under it one per
    incarnation (uid), so a job deleted and created again under the same name starts a run of its own
    instead of resuming the old one."""
    claim = storage_claim(owner, spec)
    if claim is None:
        return training.OUTPUT_DIR
    return posixpath.join(DEFAULT_VOLUMES_ROOT, claim, "kubelm", owner.namespace, owner.name, owner.uid)


def base_model_source(spec: TrainingJobSpec, artifact_uri: str | None) -> dict[str, Any]:
    """The runtime's baseModel: hub and uri as given; trainingJobRef becomes that job's artifact."""
    base = spec.base_model
    source: dict[str, Any]
    if base.hub is not None:
        source = {"hub": dump(base.hub)}
    elif base.uri is not None:
        source = {"uri": base.uri}
    else:
        if artifact_uri is None:
            raise ValueError("a trainingJobRef resolves only once that job has an artifact")
        source = {"artifact": artifact_uri}
    if base.tokenizer:
        source["tokenizer"] = base.tokenizer
    return source


def training_config(owner: Owner, spec: TrainingJobSpec, artifact_uri: str | None,
                    progress_interval_seconds: float) -> dict[str, Any]:
    """The runtime's training configuration (runtime-contract.md) for this job."""
    return {
        "jobId": owner.id,
        "incarnation": owner.uid,
        "outputDir": output_dir(owner, spec),
        "baseModel": base_model_source(spec, artifact_uri),
        "dataset": dump(spec.dataset),
        "hyperparameters": dump(spec.hyperparameters),
        "checkpointing": dump(spec.checkpointing),
        "publish": dump(spec.publish),
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "progressIntervalSeconds": progress_interval_seconds,
    }


def config_map(owner: Owner, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, names(owner).config_map, COMPONENT),
        # JSON (which YAML readers take too): rendering YAML cost a tenth of the operator's CPU at scale.
        "data": {training.CONFIG_FILE_NAME: json.dumps(config, indent=2)},
    }


def connection_secret(owner: Owner, redis_url: str) -> dict[str, Any]:
    """The Redis URL the trainer reports progress and publishes to, in the job's own namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner, names(owner).secret, COMPONENT),
        "type": "Opaque",
        "data": secret_data({REDIS_URL_KEY: redis_url}),
    }


def rendezvous_service(owner: Owner) -> dict[str, Any]:
    """Headless: gives rank 0 the stable name <job>-0.<service> the other ranks connect to."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, names(owner).service, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "selector": {"kubelm.io/trainingjob": labels(owner, COMPONENT)["kubelm.io/trainingjob"]},
            # Ranks resolve each other before any of them could be called ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": training.RENDEZVOUS_PORT,
                       "targetPort": training.RENDEZVOUS_PORT}],
        },
    }


def checkpoint_claim(owner: Owner, spec: TrainingJobSpec) -> dict[str, Any]:
    storage = spec.storage
    assert storage.size is not None
    claim_spec: dict[str, Any] = {
        # Every rank must see rank 0's checkpoints to resume, so several workers need shared access.
        "accessModes": ["ReadWriteOnce" if spec.workers == 1 else "ReadWriteMany"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        claim_spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(owner, names(owner).claim, COMPONENT),
        "spec": claim_spec,
    }


def _quantity(value: str | int) -> str:
    return str(value)


def _volumes(owner: Owner, spec: TrainingJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    n = names(owner)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": n.config_map}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # NCCL and torch's shared-memory tensors need more than the runtime's default 64 MiB.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": training.CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": training.CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    storage = storage_claim(owner, spec)
    if storage is None:
        volumes.append({"name": "output", "emptyDir": {}})
        mounts.append({"name": "output", "mountPath": training.OUTPUT_DIR})
    claims = sorted(set(spec.claims().values()) | ({storage} if storage else set()))
    for index, claim in enumerate(claims):
        volume = f"claim-{index}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim,
                                                                  "readOnly": claim != storage}})
        mounts.append({"name": volume, "mountPath": posixpath.join(DEFAULT_VOLUMES_ROOT, claim),
                       "readOnly": claim != storage})
    return volumes, mounts


def _env(owner: Owner, spec: TrainingJobSpec, with_redis: bool) -> list[dict[str, Any]]:
    n = names(owner)
    variables: list[dict[str, Any]] = [
        {"name": env.CONFIG_FILE, "value": posixpath.join(training.CONFIG_DIR, training.CONFIG_FILE_NAME)},
        {"name": env.VOLUMES_ROOT, "value": DEFAULT_VOLUMES_ROOT},
        # The root filesystem is read-only: everything that writes under HOME writes to /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": posixpath.join(training.CACHE_DIR, "hf")},
        # Each pod runs one rank; the Job controller sets JOB_COMPLETION_INDEX, which the runtime reads as RANK.
        {"name": "WORLD_SIZE", "value": str(spec.workers)},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "MASTER_ADDR", "value": f"{n.job}-0.{n.service}" if spec.workers > 1 else "localhost"},
        {"name": "MASTER_PORT", "value": str(training.RENDEZVOUS_PORT)},
    ]
    if with_redis:
        variables.append({"name": env.REDIS_URL,
                          "valueFrom": {"secretKeyRef": {"name": n.secret, "key": REDIS_URL_KEY}}})
    return variables


def job(owner: Owner, spec: TrainingJobSpec, image: str, config_digest: str, with_redis: bool) -> dict[str, Any]:
    """The Indexed Job: one pod per data-parallel rank, retried by the Job controller up to backoffLimit."""
    n = names(owner)
    resources: dict[str, str] = {"cpu": _quantity(spec.resources.cpu), "memory": _quantity(spec.resources.memory)}
    if spec.resources.gpus > 0:
        resources["nvidia.com/gpu"] = str(spec.resources.gpus)
    volumes, mounts = _volumes(owner, spec)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or image,
        "args": ["train"],
        "env": _env(owner, spec, with_redis),
        "resources": {"requests": resources, "limits": dict(resources)},
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # A failed trainer's last log lines become the container's termination message, shown in status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.workers > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": training.RENDEZVOUS_PORT}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.workers > 1:
        pod_spec["subdomain"] = n.service
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dump(t) for t in spec.tolerations]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.workers,
        "parallelism": spec.workers,
        "backoffLimit": spec.backoff_limit,
        "suspend": spec.suspend,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [INVALID_CONFIGURATION_EXIT_CODE]}},
            # An evicted or preempted pod is not the trainer's fault: retry it without counting.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "template": {
            "metadata": {"labels": labels(owner, COMPONENT),
                         # A new configuration means new pods; the template is immutable otherwise.
                         "annotations": {"kubelm.io/config-digest": config_digest}},
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(owner, n.job, COMPONENT),
            "spec": job_spec}


def children(owner: Owner, spec: TrainingJobSpec, *, image: str, redis_url: str | None,
             artifact_uri: str | None, progress_interval_seconds: float) -> list[dict[str, Any]]:
    """Every child in the order they must exist: the Job last, once what its pods mount is there."""
    config = training_config(owner, spec, artifact_uri, progress_interval_seconds)
    objects = [config_map(owner, config)]
    if redis_url:
        objects.append(connection_secret(owner, redis_url))
    if spec.workers > 1:
        objects.append(rendezvous_service(owner))
    if spec.storage.type == "pvc" and spec.storage.claim_name is None:
        objects.append(checkpoint_claim(owner, spec))
    objects.append(job(owner, spec, image, digest(config), bool(redis_url)))
    return objects
