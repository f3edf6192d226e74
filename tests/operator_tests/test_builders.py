"""Golden tests of the TrainingJob builders: the whole object that lands in the cluster."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelm_contract import training
from kubelm_operator.builders import training as build
from kubelm_operator.builders.common import Owner
from kubelm_operator.spec import parse_trainingjob
from kubelm_runtime.config import load_config
from kubelm_runtime.train.settings import TrainConfig
from support import REPO

IMAGE = "kubelm/runtime:0.1.0"
REDIS = "redis://redis.kubelm-system.svc:6379/0"
SAMPLES = sorted((REPO / "manifests" / "samples").glob("trainingjob-*.yaml"))
LABELS = {"app.kubernetes.io/name": "kubelm", "app.kubernetes.io/instance": "gpt2-chat-gpu",
          "app.kubernetes.io/component": "training", "app.kubernetes.io/managed-by": "kubelm-operator",
          "kubelm.io/trainingjob": "gpt2-chat-gpu"}
OWNER_REFS = [{"apiVersion": "kubelm.io/v1alpha1", "kind": "TrainingJob", "name": "gpt2-chat-gpu", "uid": "uid-1",
               "controller": True, "blockOwnerDeletion": True}]
RESTRICTED = {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def _sample(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "manifests" / "samples" / name).read_text()))


def _children(spec: dict[str, Any], name: str = "gpt2-chat-gpu", redis: str | None = REDIS,
              artifact: str | None = None) -> dict[str, dict[str, Any]]:
    owner = Owner("TrainingJob", "team-a", name, "uid-1")
    objects = build.children(owner, parse_trainingjob(spec), image=IMAGE, redis_url=redis, artifact_uri=artifact,
                             progress_interval_seconds=10)
    return {o["kind"]: o for o in objects}


def test_gpu_sample_gives_this_indexed_job() -> None:
    job = _children(_sample("trainingjob-gpu.yaml")["spec"])["Job"]
    assert job == {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "gpt2-chat-gpu-train", "namespace": "team-a", "labels": LABELS,
                     "ownerReferences": OWNER_REFS},
        "spec": {
            "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 5, "suspend": False,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {"kubelm.io/config-digest": "19ee805f7b681455"}},
                "spec": {
                    "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "train", "image": IMAGE, "args": ["train"],
                        "env": [
                            {"name": "KUBELM_CONFIG", "value": "/etc/kubelm/train.json"},
                            {"name": "KUBELM_VOLUMES_ROOT", "value": "/mnt/kubelm/volumes"},
                            {"name": "HOME", "value": "/tmp"},
                            {"name": "HF_HOME", "value": "/var/cache/kubelm/hf"},
                            {"name": "WORLD_SIZE", "value": "2"},
                            {"name": "LOCAL_RANK", "value": "0"},
                            {"name": "MASTER_ADDR", "value": "gpt2-chat-gpu-train-0.gpt2-chat-gpu-train"},
                            {"name": "MASTER_PORT", "value": "29500"},
                            {"name": "KUBELM_REDIS_URL", "valueFrom": {"secretKeyRef": {
                                "name": "gpt2-chat-gpu-train-env", "key": "redis-url"}}}],
                        "resources": {"requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                      "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}},
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/etc/kubelm", "readOnly": True},
                            {"name": "cache", "mountPath": "/var/cache/kubelm"},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "shm", "mountPath": "/dev/shm"},
                            {"name": "claim-0", "mountPath": "/mnt/kubelm/volumes/datasets", "readOnly": True},
                            {"name": "claim-1", "mountPath": "/mnt/kubelm/volumes/gpt2-chat-checkpoints",
                             "readOnly": False}],
                        "securityContext": RESTRICTED,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "ports": [{"name": "rendezvous", "containerPort": 29500}]}],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "gpt2-chat-gpu-train"}},
                        {"name": "cache", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                        {"name": "claim-0", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
                        {"name": "claim-1", "persistentVolumeClaim": {"claimName": "gpt2-chat-checkpoints",
                                                                      "readOnly": False}}],
                    "subdomain": "gpt2-chat-gpu-train",
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
            "activeDeadlineSeconds": 86400}}


def test_gpu_sample_gives_this_configuration_secret_and_service() -> None:
    children = _children(_sample("trainingjob-gpu.yaml")["spec"])
    assert sorted(children) == ["ConfigMap", "Job", "Secret", "Service"]
    meta = {"namespace": "team-a", "labels": LABELS, "ownerReferences": OWNER_REFS}
    assert children["Secret"] == {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": "gpt2-chat-gpu-train-env", **meta},
                                  "type": "Opaque", "data": {"redis-url": base64.b64encode(REDIS.encode()).decode()}}
    assert children["Service"] == {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "gpt2-chat-gpu-train", **meta},
        "spec": {"clusterIP": "None", "selector": {"kubelm.io/trainingjob": "gpt2-chat-gpu"},
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]}}
    config_map = children["ConfigMap"]
    assert config_map["metadata"] == {"name": "gpt2-chat-gpu-train", **meta}
    assert yaml.safe_load(config_map["data"]["train.json"]) == {
        "jobId": "team-a/gpt2-chat-gpu",
        "incarnation": "uid-1",
        "outputDir": "/mnt/kubelm/volumes/gpt2-chat-checkpoints/kubelm/team-a/gpt2-chat-gpu/uid-1",
        "baseModel": {"hub": {"id": "openai-community/gpt2-medium", "revision": "main"}},
        "dataset": {"train": "pvc://datasets/chat/train.jsonl", "validation": "pvc://datasets/chat/valid.jsonl",
                    "format": "jsonl", "textField": "content"},
        "hyperparameters": {"epochs": 1, "maxSteps": 5000, "batchSize": 16, "gradientAccumulationSteps": 4,
                            "learningRate": 0.0003, "warmupSteps": 200, "lrSchedule": "cosine", "weightDecay": 0.1,
                            "maxGradNorm": 1.0, "maxLength": 1024, "seed": 42, "precision": "auto",
                            "evalIntervalSteps": 500},
        "checkpointing": {"intervalSteps": 250, "keep": 3},
        "publish": {"artifactCache": True},
        "device": "cuda",
        "progressIntervalSeconds": 10,
    }


def test_cpu_sample_gets_a_claim_the_operator_owns() -> None:
    children = _children(_sample("trainingjob-cpu.yaml")["spec"], name="tiny-story")
    assert sorted(children) == ["ConfigMap", "Job", "PersistentVolumeClaim", "Secret"]
    labels = {**LABELS, "app.kubernetes.io/instance": "tiny-story", "kubelm.io/trainingjob": "tiny-story"}
    assert children["PersistentVolumeClaim"] == {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "tiny-story-checkpoints", "namespace": "team-a", "labels": labels,
                     "ownerReferences": [{**OWNER_REFS[0], "name": "tiny-story"}]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}}
    pod = children["Job"]["spec"]["template"]["spec"]
    assert "subdomain" not in pod and "ports" not in pod["containers"][0]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                                 "limits": {"cpu": "4", "memory": "8Gi"}}
    assert {"name": "MASTER_ADDR", "value": "localhost"} in pod["containers"][0]["env"]
    assert pod["volumes"][-1] == {"name": "claim-1", "persistentVolumeClaim": {"claimName": "tiny-story-checkpoints",
                                                                               "readOnly": False}}


def test_ephemeral_storage_without_redis() -> None:
    spec = {"baseModel": {"uri": "/models/tiny"}, "dataset": {"train": "/data/train.txt"}}
    children = _children(spec, redis=None)
    assert sorted(children) == ["ConfigMap", "Job"]
    container = children["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert not any(v["name"] == "KUBELM_REDIS_URL" for v in container["env"])
    assert {"name": "output", "mountPath": "/var/lib/kubelm/job"} in container["volumeMounts"]
    config = yaml.safe_load(children["ConfigMap"]["data"]["train.json"])
    assert config["outputDir"] == "/var/lib/kubelm/job" and config["device"] == "cpu"
    assert config["incarnation"] == "uid-1"


def test_a_job_created_again_under_its_name_gets_its_own_output_directory() -> None:
    """Same name, same claim, new uid: a fresh folder, so the old object's checkpoints are never resumed."""
    spec = parse_trainingjob({"baseModel": {"uri": "/m"}, "dataset": {"train": "/d"},
                              "storage": {"type": "pvc", "claimName": "shared"}})
    configs = [build.training_config(Owner("TrainingJob", "team-a", "tuned", uid), spec, None, 10)
               for uid in ("uid-1", "uid-2")]
    assert [(c["jobId"], c["incarnation"], c["outputDir"]) for c in configs] == [
        ("team-a/tuned", "uid-1", "/mnt/kubelm/volumes/shared/kubelm/team-a/tuned/uid-1"),
        ("team-a/tuned", "uid-2", "/mnt/kubelm/volumes/shared/kubelm/team-a/tuned/uid-2")]


def test_training_job_ref_becomes_the_artifact() -> None:
    spec = {"baseModel": {"trainingJobRef": {"name": "first"}, "tokenizer": "gpt2"}, "dataset": {"train": "/d"}}
    config = yaml.safe_load(_children(spec, artifact="artifact://team-a/first@3")["ConfigMap"]["data"]["train.json"])
    assert config["baseModel"] == {"artifact": "artifact://team-a/first@3", "tokenizer": "gpt2"}
    with pytest.raises(ValueError, match="resolves only once that job has an artifact"):
        _children(spec, artifact=None)


def test_a_long_name_gives_valid_child_names() -> None:
    name = "a-very-long-training-job-name-" + "x" * 200
    children = _children({"baseModel": {"uri": "/m"}, "dataset": {"train": "/d"}, "workers": 3}, name=name)
    for obj in children.values():
        assert len(obj["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())
    assert len(children["Job"]["metadata"]["name"]) <= 52


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_runtime_reads_the_rendered_configuration(sample: Any, tmp_path: Path) -> None:
    """The contract: what the operator writes is what the trainer's own reader accepts, field for field."""
    raw = yaml.safe_load(sample.read_text())["spec"]
    spec = parse_trainingjob(raw)
    config_map = _children(raw)["ConfigMap"]
    (path := tmp_path / training.CONFIG_FILE_NAME).write_text(config_map["data"][training.CONFIG_FILE_NAME])
    config = load_config(TrainConfig, path)
    assert config.dataset == spec.dataset
    assert config.hyperparameters == spec.hyperparameters
    assert config.checkpointing == spec.checkpointing
    assert (config.publish.artifact_cache, config.publish.name) == (spec.publish.artifact_cache, spec.publish.name)
    assert config.job_id == "team-a/gpt2-chat-gpu"
    assert config.incarnation == "uid-1"
    assert config.base_model.hub == spec.base_model.hub
    assert config.device == ("cuda" if spec.resources.gpus else "cpu")
