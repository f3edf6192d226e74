"""The CRDs against the real apiserver: install, samples, defaults, printer columns, explain."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from support import REPO, ClusterEnv

from .conftest import GROUP, VERSION

pytestmark = pytest.mark.cluster

SAMPLES = sorted(p for p in (REPO / "manifests" / "samples").glob("*.yaml") if p.name != "kustomization.yaml")
PLURALS = {"LanguageModel": "languagemodels", "TrainingJob": "trainingjobs"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_crds_are_established(api_client: client.ApiClient, crds: None) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    for name in ("languagemodels.kubelm.io", "trainingjobs.kubelm.io"):
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert crd.spec.names.categories == ["kubelm"]
        assert crd.spec.versions[0].subresources.status is not None


def test_samples_exist_for_both_kinds_and_a_gpu() -> None:
    kinds = [load(p)["kind"] for p in SAMPLES]
    assert kinds.count("LanguageModel") >= 2 and kinds.count("TrainingJob") >= 2
    assert any("gpu" in p.name for p in SAMPLES)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_is_accepted_by_server_side_dry_run(custom: client.CustomObjectsApi, namespace: str,
                                                   sample: Path) -> None:
    body = load(sample)
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[body["kind"]], body, dry_run="All")
    assert created["metadata"]["name"] == body["metadata"]["name"]
    # What the user wrote survives, and the defaults they left out are filled in.
    assert _contains(created["spec"], body["spec"])
    assert created["spec"]["suspend"] is False


def _contains(actual: object, expected: object) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(_contains(actual.get(k), v) for k, v in expected.items())
    return actual == expected


def test_languagemodel_defaults_are_applied(custom: client.CustomObjectsApi, namespace: str) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "metadata": {"name": "minimal"},
            "spec": {"model": {"hub": {"id": "gpt2"}}}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", body)
    spec = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "minimal")["spec"]
    assert spec["model"]["hub"] == {"id": "gpt2", "revision": "main"}
    assert spec["resources"] == {"cpu": "1", "memory": "2Gi", "gpus": 0}
    assert spec["generation"] == {"maxNewTokens": 128, "temperature": 1.0, "topP": 1.0, "topK": 0,
                                  "repetitionPenalty": 1.0}
    assert spec["limits"] == {"maxInputTokens": 1024, "maxNewTokens": 512}
    assert spec["batching"] == {"maxBatchSize": 16, "maxWaitMillis": 10}
    assert spec["queue"] == {"type": "quorum", "deadLetter": True, "deletionPolicy": "Delete"}
    assert spec["cache"] == {"responses": {"enabled": True, "ttlSeconds": 3600, "backend": "redis"},
                             "deletionPolicy": "Delete"}
    assert spec["autoscaling"] == {"engine": "builtin", "minReplicas": 1, "maxReplicas": 4,
                                   "targetQueueLengthPerReplica": 16, "activationQueueLength": 0,
                                   "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 300}
    assert spec["gateway"] == {"enabled": True, "replicas": 1, "serviceType": "ClusterIP"}


def test_trainingjob_defaults_are_applied(custom: client.CustomObjectsApi, namespace: str) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {"name": "minimal"},
            "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"train": "/data/train.txt"}}}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", body)
    spec = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "minimal")["spec"]
    assert spec["dataset"] == {"train": "/data/train.txt", "format": "text", "textField": "text"}
    assert spec["hyperparameters"] == {
        "epochs": 1, "batchSize": 8, "gradientAccumulationSteps": 1, "learningRate": 0.00005, "warmupSteps": 0,
        "lrSchedule": "linear", "weightDecay": 0.0, "maxGradNorm": 1.0, "maxLength": 512, "seed": 42,
        "precision": "auto", "evalIntervalSteps": 500}
    assert spec["workers"] == 1
    assert spec["checkpointing"] == {"intervalSteps": 200, "keep": 2}
    assert spec["storage"] == {"type": "ephemeral"}
    assert spec["publish"] == {"artifactCache": True}
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False


def test_printer_columns_show_status(cluster: ClusterEnv, custom: client.CustomObjectsApi, namespace: str) -> None:
    lm = load(REPO / "manifests/samples/languagemodel-cpu.yaml")
    tj = load(REPO / "manifests/samples/trainingjob-cpu.yaml")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", lm)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", tj)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "languagemodels", "gpt2", {"status": {
        "phase": "Ready", "readyReplicas": 2, "desiredReplicas": 3,
        "queue": {"name": "kubelm.x", "depth": 41, "ready": 40, "unacked": 1},
        "model": {"source": "hub:openai-community/gpt2"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "WorkersReady", "message": "2 of 3",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "trainingjobs", "tiny-story", {"status": {
        "phase": "Running", "progress": {"step": 120, "totalSteps": 480, "percent": 25, "loss": 3.25,
                                         "evalLoss": 3.5}}})

    out = cluster.kubectl("get", "lm,tj", "-n", namespace).stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0] == ["NAME", "READY", "PHASE", "REPLICAS", "DESIRED", "QUEUE", "MODEL", "AGE"]
    assert lines[1][:7] == ["languagemodel.kubelm.io/gpt2", "True", "Ready", "2", "3", "41",
                            "hub:openai-community/gpt2"]
    assert lines[2] == ["NAME", "PHASE", "PROGRESS", "LOSS", "EVAL", "LOSS", "AGE"]
    assert lines[3][:5] == ["trainingjob.kubelm.io/tiny-story", "Running", "25", "3.25", "3.5"]
    # kubectl get kubelm lists both kinds through the category.
    by_category = cluster.kubectl("get", "kubelm", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(by_category) == ["languagemodel.kubelm.io/gpt2", "trainingjob.kubelm.io/tiny-story"]


@pytest.mark.parametrize(("path", "expected"), [
    ("languagemodel.spec.queue.type", "quorum (replicated, counts deliveries, recommended) or classic"),
    ("languagemodel.spec.autoscaling.minReplicas", "Fewest workers; 0 scales to zero"),
    ("lm.spec.model", "exactly one of hub, uri or trainingJobRef"),
    ("trainingjob.spec.hyperparameters.precision", "bf16 where the hardware is fast at it"),
    ("tj.spec.storage.type", "ephemeral (an emptyDir"),
    ("tj.status.progress.tokensPerSecond", "Training throughput over all workers"),
])
def test_kubectl_explain_shows_descriptions(cluster: ClusterEnv, crds: None, path: str, expected: str) -> None:
    out = " ".join(cluster.kubectl("explain", path).stdout.split())
    assert expected in out


def test_every_field_has_a_description() -> None:
    def walk(schema: dict, where: str) -> list[str]:
        missing = [] if schema.get("description") or where.endswith(".metadata") else [where]
        for name, sub in schema.get("properties", {}).items():
            missing += walk(sub, f"{where}.{name}")
        if isinstance(schema.get("items"), dict) and schema["items"].get("type") == "object":
            missing += walk(schema["items"], f"{where}[]")
        return missing

    for path in sorted((REPO / "crds").glob("*.kubelm.io.yaml")):
        crd = load(path)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert walk(copy.deepcopy(schema), crd["spec"]["names"]["kind"]) == [], path.name


def test_kustomize_base_renders_the_crds_and_namespace(cluster: ClusterEnv) -> None:
    rendered = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests" / "base")).stdout))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == [
        ("CustomResourceDefinition", "languagemodels.kubelm.io"),
        ("CustomResourceDefinition", "trainingjobs.kubelm.io"),
        ("Namespace", "kubelm-system"),
    ]
    samples = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests" / "samples")).stdout))
    assert len(samples) == len(SAMPLES)
