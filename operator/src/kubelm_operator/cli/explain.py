"""One plain sentence on why a TrainingJob or LanguageModel is not Ready, and what to do about it.

Pure: the object as the API server returns it goes in, an Explanation comes out. The sentences are keyed by
the reasons the operator writes into the Ready and Stalled conditions (docs/operator.md lists them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..status.conditions import READY, STALLED, find

TRAINING_JOB, LANGUAGE_MODEL = "TrainingJob", "LanguageModel"


@dataclass(frozen=True)
class Explanation:
    ready: bool
    reason: str
    sentence: str


def _gpus(obj: dict[str, Any]) -> int:
    return int(((obj.get("spec") or {}).get("resources") or {}).get("gpus") or 0)


def duration(seconds: float | None) -> str:
    """45s, 3m05s, 2h10m."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _unschedulable(obj: dict[str, Any], message: str) -> str:
    gpus = _gpus(obj)
    if gpus and re.search(r"nvidia\.com/gpu|gpu", message, re.IGNORECASE):
        per = "worker" if obj.get("kind") == TRAINING_JOB else "replica"
        return (f"No node has the {gpus} GPU(s) per {per} it asks for ({message}). Add a GPU node with the "
                "NVIDIA device plugin, set spec.tolerations for tainted GPU nodes, or lower spec.resources.gpus.")
    return (f"No node can take its pods ({message}). Free or add capacity, or lower spec.resources; "
            "check spec.nodeSelector and spec.tolerations.")


def _failed_training(message: str) -> str:
    hint = " Raise spec.resources.memory (the trainer ran out of memory)." if "OOMKilled" in message else ""
    return (f"Training failed with its last reported error: {message}.{hint} Fix the cause, then delete and "
            "re-apply the TrainingJob.")


# Reasons whose sentence is the same for both kinds; {m} is the condition's message.
_COMMON = {
    "InvalidSpec": "The spec cannot be used: {m}. Fix it and apply again.",
    "InvalidChild": "The API server refused an object made from the spec: {m}. Fix the spec and apply again.",
    "InvalidReference": "The model source is invalid: {m}. Point it at another TrainingJob.",
    "TrainingJobNotFound": "It waits for a TrainingJob that does not exist ({m}). Create that TrainingJob, "
                           "or fix spec.{field}.trainingJobRef.",
    "TrainingJobFailed": "Its model source failed ({m}). Fix and re-run that TrainingJob, or point "
                         "spec.{field}.trainingJobRef at another one.",
    "WaitingForTrainingJob": "Waiting for a TrainingJob to succeed ({m}); it becomes Ready on its own once the "
                             "artifact is published.",
    "Creating": "The operator is creating its objects; nothing to do yet.",
}

_TRAINING = {
    "ClaimNotFound": "A PersistentVolumeClaim it needs is missing ({m}). Create the claim, or fix the spec.",
    "WaitingForPods": "Waiting for the worker pods to start ({m}): image pulls and node start-up; "
                      "`kubectl describe pod` shows what they wait for if this lasts.",
    "Finishing": "The workers finished; the Job is completing and the artifact will be published.",
    "ArtifactUnknown": "Training succeeded but no artifact was recorded ({m}); check the operator's logs.",
    "WaitingForPreviousJob": "A Job left by an earlier TrainingJob of the same name is still being removed ({m}); "
                             "this one starts training once it is gone.",
    "NameTaken": "Its Job's name is taken by a Job kubelm did not make ({m}). Delete or rename that Job, or "
                 "rename the TrainingJob.",
}

_SERVING = {
    "QueueArgumentConflict": "Its request queue already exists with other arguments ({m}). RabbitMQ cannot "
                             "change a queue's arguments: restore the old spec.queue value, or delete the queue "
                             "(its waiting requests are lost) so that the operator declares it anew.",
    "BrokerUnavailable": "RabbitMQ cannot be reached ({m}). Check that it runs and that the kubelm-connections "
                         "Secret's KUBELM_AMQP_URL and KUBELM_RABBITMQ_API_URL point at it.",
    "RedisUnavailable": "Redis cannot be reached ({m}). Check that it runs and the kubelm-connections Secret's "
                        "KUBELM_REDIS_URL.",
    "ModelLoadFailed": "The model source is missing or cannot be loaded ({m}). Fix spec.model (hub id, uri or "
                       "trainingJobRef) or make the files available to the workers.",
    "MemcachedNotConfigured": "Its response cache is to live in Memcached, but none is configured ({m}). Add "
                              "KUBELM_MEMCACHED_URL to the kubelm-connections Secret, or set "
                              "spec.cache.responses.backend to redis; it serves meanwhile, without the cache.",
    "KedaNotInstalled": "spec.autoscaling.engine is keda but KEDA is not installed ({m}). Install KEDA or use "
                        "the built-in engine.",
    "Loading": "A worker is loading the model ({m}); it becomes Ready when the first worker is.",
    "WorkersNotReady": "Some workers are not ready ({m}); `kubectl describe pod` on them shows why.",
    "GatewayNotReady": "Its gateway is not ready yet ({m}); requests to the endpoint wait for it. If it stays so, "
                       "`kubectl describe pod` on the gateway's pods shows why.",
    "ImagePullBackOff": "A worker's image cannot be pulled ({m}). Fix spec.image or the registry credentials.",
    "ErrImagePull": "A worker's image cannot be pulled ({m}). Fix spec.image or the registry credentials.",
    "CrashLoopBackOff": "A worker keeps crashing ({m}); `kubectl logs --previous` on it shows why.",
    "RollingOut": "The workers roll to a new revision ({m}); it is Ready again once no pod of the older one "
                  "serves.",
    "GatewayRollingOut": "The gateway rolls to a new revision ({m}); it is Ready again once no pod of the older "
                         "one serves.",
    "AuthSecretNotFound": "The gateway's API key Secret is missing ({m}). Create it, or fix "
                          "spec.gateway.authSecretRef; the workers keep serving the queue meanwhile.",
}


def explain(obj: dict[str, Any]) -> Explanation:
    kind = str(obj.get("kind"))
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if not status or observed is None:
        return Explanation(False, "NotObserved", "The operator has not written a status yet: check that it "
                           "runs (`kubectl -n kubelm-system get deploy kubelm-operator`) and watches this namespace.")
    if generation is not None and int(observed) < int(generation):
        return Explanation(False, "NotObserved", f"The operator has not yet acted on the latest spec "
                           f"(generation {generation}, status is of {observed}); it runs, or it is behind.")
    conditions = status.get("conditions") or []
    ready, stalled = find(conditions, READY) or {}, find(conditions, STALLED) or {}
    phase = str(status.get("phase") or "")
    if phase == "Suspended":
        return Explanation(False, "Suspended", "It is suspended (spec.suspend is true); set it to false to resume.")
    if ready.get("status") == "True":
        return Explanation(True, str(ready.get("reason")), _ready_sentence(kind, status, str(ready.get("reason"))))
    cause = stalled if stalled.get("status") == "True" else ready
    reason, message = str(cause.get("reason") or phase or "Unknown"), str(cause.get("message") or "").rstrip(".")
    return Explanation(False, reason, _not_ready_sentence(obj, kind, phase, reason, message))


def _ready_sentence(kind: str, status: dict[str, Any], reason: str) -> str:
    if kind == TRAINING_JOB:
        artifact = status.get("artifact") or {}
        return f"Ready: trained; the model is published as {artifact.get('uri')} (version {artifact.get('version')})."
    if reason == "ScaledToZero":
        return "Ready: no requests wait, so no workers run; the first request starts one."
    return f"Ready: {status.get('readyReplicas')}/{status.get('desiredReplicas')} workers serve its queue."


def _not_ready_sentence(obj: dict[str, Any], kind: str, phase: str, reason: str, message: str) -> str:
    field = "baseModel" if kind == TRAINING_JOB else "model"
    specific = _TRAINING if kind == TRAINING_JOB else _SERVING
    if reason == "Unschedulable":
        return _unschedulable(obj, message.split(": ", 1)[-1])
    if kind == TRAINING_JOB and phase == "Failed" and reason not in _COMMON and reason not in specific:
        return _failed_training(message)
    if kind == TRAINING_JOB and reason == "Running":
        return _running_sentence(obj)
    template = specific.get(reason) or _COMMON.get(reason)
    if template is None:
        return f"{phase or 'Not ready'}: {reason}: {message}."
    return template.format(m=message, field=field)


def _running_sentence(obj: dict[str, Any]) -> str:
    progress = (obj.get("status") or {}).get("progress") or {}
    if not progress.get("totalSteps"):
        return "Training has started; it becomes Ready when the artifact is published."
    eta = progress.get("etaSeconds")
    left = f", about {duration(eta)} left" if eta is not None else ""
    return (f"Training: step {progress.get('step', 0)}/{progress['totalSteps']}{left}; it becomes Ready when the "
            "artifact is published.")
