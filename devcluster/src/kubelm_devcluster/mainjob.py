"""The main job on the dev cluster's real node, as a user runs it: kubelm installed from its
manifests (the operator as a Pod from its image), the dev overlay's Redis and RabbitMQ, a
TrainingJob on the sample corpus, then a LanguageModel serving what it published.

`make demo` and the end-to-end tests take their objects and steps from here, so the demo
shows what the tests check. The builders are pure; `install` and `prepare_data` do I/O.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .operator import OPERATOR_NAMESPACE, REPO, Kubectl

CORPUS = REPO / "examples" / "tiny-corpus"
DATA_VOLUME = "kubelm-demo-data"
DATA_CLAIM = "demo-data"
MODEL = "tiny-story"
FIELD_MANAGER = "kubelm-demo"


@contextmanager
def port_forward(kubectl: list[str], namespace: str, target: str, port: int) -> Iterator[str]:
    """`kubectl port-forward` to a pod or Service on a free local port; yields its URL."""
    process = subprocess.Popen([*kubectl, "port-forward", "-n", namespace, target, f":{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout
        first = process.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> port"
        if "127.0.0.1:" not in first:
            raise RuntimeError(f"port-forward {target}: {first.strip()}")
        yield f"http://127.0.0.1:{first.split('127.0.0.1:')[1].split()[0]}"
    finally:
        process.kill()
        process.wait()


def install(kubectl: Kubectl, timeout: str = "600s") -> None:
    """`manifests/install` and `manifests/dev`, server-side applied; returns when the operator Pod and
    the in-cluster Redis and RabbitMQ are Ready."""
    for part in ("install", "dev"):
        kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-k", str(REPO / "manifests" / part))
    for workload in ("deployment/kubelm-operator", "statefulset/redis", "statefulset/rabbitmq"):
        kubectl("rollout", "status", "-n", OPERATOR_NAMESPACE, workload, f"--timeout={timeout}")


def prepare_data(directory: Path, runtime_cli: str) -> Path:
    """The sample corpus and a tiny base model (a 2-layer GPT-2 with a tokenizer trained on the corpus),
    in a directory the node can serve as a volume, readable by the pods' non-root user."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        shutil.copy(CORPUS / f"{split}.txt", directory / f"{split}.txt")
    if not (directory / "base" / "config.json").exists():
        subprocess.run([runtime_cli, "tiny-model", "--corpus", str(CORPUS / "train.txt"), "--out",
                        str(directory / "base")], check=True, capture_output=True, text=True)
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


def data_volume(directory: Path, namespace: str) -> list[dict[str, Any]]:
    """A hostPath PersistentVolume bound in advance to the claim the TrainingJob reads (the dev node has
    no provisioner; on a real cluster this is any claim holding the same files)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": DATA_VOLUME, "labels": {"app.kubernetes.io/part-of": "kubelm-demo"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(directory), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": DATA_CLAIM},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": DATA_CLAIM, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": DATA_VOLUME,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def training_job(namespace: str, steps: int = 200, name: str = MODEL) -> dict[str, Any]:
    """Fine-tunes the tiny base model on the corpus, on CPU; about a minute on two cores at 200 steps."""
    claim = f"pvc://{DATA_CLAIM}"
    return {
        "apiVersion": "kubelm.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": f"{claim}/base"},
            "dataset": {"train": f"{claim}/train.txt", "validation": f"{claim}/valid.txt",
                        "test": f"{claim}/test.txt"},
            "hyperparameters": {"maxSteps": steps, "batchSize": 8, "maxLength": 64, "learningRate": 0.003,
                                "warmupSteps": 10, "evalIntervalSteps": max(steps // 4, 1)},
            "checkpointing": {"intervalSteps": max(steps // 2, 1), "keep": 1},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }


def language_model(namespace: str, training_job_name: str = MODEL, name: str = MODEL,
                   **spec: Any) -> dict[str, Any]:
    """Serves what the TrainingJob published; `spec` adds or replaces top-level spec fields."""
    return {
        "apiVersion": "kubelm.io/v1alpha1",
        "kind": "LanguageModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"trainingJobRef": {"name": training_job_name}},
            "generation": {"maxNewTokens": 32, "temperature": 0.8},
            "batching": {"maxBatchSize": 8, "maxWaitMillis": 10},
            "resources": {"cpu": "500m", "memory": "1Gi"},
            **spec,
        },
    }
