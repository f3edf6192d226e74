"""Invalid objects are rejected by the apiserver (schema and CEL) with a message naming the problem."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import GROUP, VERSION

pytestmark = pytest.mark.cluster

LM = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageModel", "metadata": {"name": "bad"},
      "spec": {"model": {"hub": {"id": "gpt2"}}}}
TJ = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {"name": "bad"},
      "spec": {"baseModel": {"hub": {"id": "gpt2"}}, "dataset": {"train": "/data/train.txt"}}}


def lm(**spec: object) -> dict:
    body = copy.deepcopy(LM)
    body["spec"].update(spec)
    return body


def tj(**spec: object) -> dict:
    body = copy.deepcopy(TJ)
    body["spec"].update(spec)
    return body


def without(body: dict, key: str) -> dict:
    body = copy.deepcopy(body)
    del body["spec"][key]
    return body


INVALID: list[tuple[str, dict, str]] = [
    # LanguageModel
    ("lm-no-model", without(LM, "model"), "spec.model: Required value"),
    ("lm-empty-model", lm(model={}), "spec.model needs exactly one of hub, uri or trainingJobRef"),
    ("lm-two-sources", lm(model={"hub": {"id": "gpt2"}, "uri": "/models/x"}),
     "spec.model needs exactly one of hub, uri or trainingJobRef"),
    ("lm-bad-hub-id", lm(model={"hub": {"id": "not a repo!"}}), "spec.model.hub.id"),
    ("lm-hub-without-id", lm(model={"hub": {"revision": "main"}}), "spec.model.hub.id: Required value"),
    ("lm-relative-uri", lm(model={"uri": "models/x"}), "spec.model.uri"),
    ("lm-bad-pvc-uri", lm(model={"uri": "pvc://Bad_Claim/x"}), "spec.model.uri"),
    ("lm-min-over-max", lm(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
     "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"),
    ("lm-negative-min", lm(autoscaling={"minReplicas": -1}), "spec.autoscaling.minReplicas"),
    ("lm-unknown-engine", lm(autoscaling={"engine": "magic"}), "spec.autoscaling.engine"),
    ("lm-default-over-ceiling", lm(generation={"maxNewTokens": 600}, limits={"maxNewTokens": 512}),
     "spec.generation.maxNewTokens must not exceed spec.limits.maxNewTokens"),
    ("lm-negative-temperature", lm(generation={"temperature": -0.5}), "spec.generation.temperature"),
    ("lm-top-p-zero", lm(generation={"topP": 0}), "spec.generation.topP"),
    ("lm-top-p-over-one", lm(generation={"topP": 1.5}), "spec.generation.topP"),
    ("lm-too-many-stops", lm(generation={"stop": ["a", "b", "c", "d", "e"]}), "spec.generation.stop"),
    ("lm-zero-batch", lm(batching={"maxBatchSize": 0}), "spec.batching.maxBatchSize"),
    ("lm-unknown-queue-type", lm(queue={"type": "stream"}), "spec.queue.type"),
    ("lm-classic-delivery-limit", lm(queue={"type": "classic", "deliveryLimit": 3}),
     "spec.queue.deliveryLimit needs spec.queue.type quorum"),
    ("lm-bad-deletion-policy", lm(queue={"deletionPolicy": "Orphan"}), "spec.queue.deletionPolicy"),
    ("lm-bad-service-type", lm(gateway={"serviceType": "ExternalName"}), "spec.gateway.serviceType"),
    ("lm-auth-without-name", lm(gateway={"authSecretRef": {"key": "token"}}),
     "spec.gateway.authSecretRef.name: Required value"),
    ("lm-bad-cpu", lm(resources={"cpu": "lots"}), "spec.resources.cpu"),
    ("lm-negative-gpus", lm(resources={"gpus": -1}), "spec.resources.gpus"),
    ("lm-bad-toleration-operator", lm(tolerations=[{"key": "x", "operator": "In"}]), "spec.tolerations[0].operator"),
    ("lm-cache-ttl-zero", lm(cache={"responses": {"ttlSeconds": 0}}), "spec.cache.responses.ttlSeconds"),
    # TrainingJob
    ("tj-no-dataset", without(TJ, "dataset"), "spec.dataset: Required value"),
    ("tj-no-train-file", tj(dataset={"validation": "/data/v.txt"}), "spec.dataset.train: Required value"),
    ("tj-two-base-models", tj(baseModel={"uri": "/m", "trainingJobRef": {"name": "a"}}),
     "spec.baseModel needs exactly one of hub, uri or trainingJobRef"),
    ("tj-relative-train", tj(dataset={"train": "data/train.txt"}), "spec.dataset.train"),
    ("tj-bad-format", tj(dataset={"train": "/d.csv", "format": "csv"}), "spec.dataset.format"),
    ("tj-zero-epochs", tj(hyperparameters={"epochs": 0}), "spec.hyperparameters.epochs"),
    ("tj-zero-lr", tj(hyperparameters={"learningRate": 0}), "spec.hyperparameters.learningRate"),
    ("tj-bad-precision", tj(hyperparameters={"precision": "int8"}), "spec.hyperparameters.precision"),
    ("tj-tiny-max-length", tj(hyperparameters={"maxLength": 4}), "spec.hyperparameters.maxLength"),
    ("tj-zero-workers", tj(workers=0), "spec.workers"),
    ("tj-keep-zero", tj(checkpointing={"keep": 0}), "spec.checkpointing.keep"),
    ("tj-pvc-without-claim", tj(storage={"type": "pvc"}),
     "spec.storage of type pvc needs claimName (an existing claim) or size (a new claim)"),
    ("tj-ephemeral-with-size", tj(storage={"type": "ephemeral", "size": "1Gi"}),
     "spec.storage.claimName and spec.storage.size only apply to type pvc"),
    ("tj-bad-artifact-name", tj(publish={"name": "Has Spaces"}), "spec.publish.name"),
    ("tj-negative-backoff", tj(backoffLimit=-1), "spec.backoffLimit"),
    ("tj-unknown-schedule", tj(hyperparameters={"lrSchedule": "step"}), "spec.hyperparameters.lrSchedule"),
    ("lm-bad-artifact-uri", lm(model={"uri": "artifact://Not Valid@x"}), "spec.model.uri"),
    ("tj-unpublished-on-ephemeral", tj(publish={"artifactCache": False}),
     "spec.publish.artifactCache false keeps the model only in spec.storage: that needs storage type pvc"),
]


def plural(body: dict) -> str:
    return {"LanguageModel": "languagemodels", "TrainingJob": "trainingjobs"}[body["kind"]]


def rejection(action: Callable[[], object]) -> str:
    with pytest.raises(ApiException) as info:
        action()
    assert info.value.status == 422, info.value.body
    return str(json.loads(info.value.body)["message"])


def test_table_is_large_enough() -> None:
    assert len(INVALID) >= 25
    assert len({name for name, _, _ in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("body", "expected"), [(b, e) for _, b, e in INVALID], ids=[n for n, _, _ in INVALID])
def test_invalid_object_is_rejected(custom: client.CustomObjectsApi, body: dict, expected: str) -> None:
    message = rejection(lambda: custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", plural(body), body, dry_run="All"))
    assert expected in message


def test_queue_arguments_are_immutable(custom: client.CustomObjectsApi, namespace: str) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", lm(queue={"type": "quorum"}))
    message = rejection(lambda: custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "languagemodels", "bad", {"spec": {"queue": {"type": "classic"}}}))
    assert "spec.queue.type is immutable" in message
    # So are the other arguments of the queue, added, changed or removed; its deletion policy may change.
    for change in ({"maxLength": 100}, {"messageTtlSeconds": 60}, {"deliveryLimit": 5}, {"deadLetter": False}):
        message = rejection(lambda c=change: custom.patch_namespaced_custom_object(  # type: ignore[misc]
            GROUP, VERSION, namespace, "languagemodels", "bad", {"spec": {"queue": c}}))
        assert "are immutable: RabbitMQ cannot change the arguments of a declared queue" in message, change
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "bad",
                                          {"spec": {"queue": {"deletionPolicy": "Retain"}}})
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "languagemodels", "bad",
                                          {"spec": {"queue": {"deadLetter": True}}})  # the default, unchanged


@pytest.mark.parametrize("change", [
    {"hyperparameters": {"learningRate": 0.001}},
    {"workers": 2},
    {"image": "example.com/other:1"},
    {"activeDeadlineSeconds": 60},
    {"dataset": {"train": "/data/other.txt"}},
], ids=lambda c: next(iter(c)))
def test_trainingjob_spec_is_immutable_except_suspend(custom: client.CustomObjectsApi, namespace: str,
                                                      change: dict) -> None:
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", TJ)
    message = rejection(lambda: custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "bad", {"spec": change}))
    assert "TrainingJob spec is immutable except spec.suspend" in message
    suspended = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "trainingjobs", "bad", {"spec": {"suspend": True}})
    assert suspended["spec"]["suspend"] is True
