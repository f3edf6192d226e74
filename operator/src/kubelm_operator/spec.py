"""TrainingJob and LanguageModel specs as typed objects, read with the contract's settings loader.

The classes mirror crds/*.yaml field by field (a test walks both); the sections the
runtime consumes as they are come from the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kubelm_contract.serving import Batching, Cache, Generation, LimitsSpec, Queue
from kubelm_contract.settings import SettingsError, load
from kubelm_contract.training import Checkpointing, Dataset, HubModel, Hyperparameters, PublishSpec
from kubelm_contract.volumes import LocationError, claim_of


@dataclass(frozen=True)
class TrainingJobRef:
    name: str


@dataclass(frozen=True)
class ModelRef:
    """Where weights come from: a TrainingJob's baseModel, a LanguageModel's model."""

    hub: HubModel | None = None
    uri: str | None = None
    training_job_ref: TrainingJobRef | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("hub", "uri", "training_job_ref") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SettingsError("needs exactly one of hub, uri or trainingJobRef")


@dataclass(frozen=True)
class TrainingResources:
    cpu: str | int = "2"
    memory: str | int = "4Gi"
    gpus: int = 0


@dataclass(frozen=True)
class ServingResources:
    cpu: str | int = "1"
    memory: str | int = "2Gi"
    gpus: int = 0


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class Storage:
    type: Literal["ephemeral", "pvc"] = "ephemeral"
    claim_name: str | None = None
    size: str | None = None
    storage_class_name: str | None = None

    def __post_init__(self) -> None:
        if self.type == "pvc" and not (self.claim_name or self.size):
            raise SettingsError("type pvc needs claimName (an existing claim) or size (a new claim)")


@dataclass(frozen=True)
class TrainingJobSpec:
    base_model: ModelRef
    dataset: Dataset
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    workers: int = 1
    image: str | None = None
    resources: TrainingResources = field(default_factory=TrainingResources)
    node_selector: dict[str, str] | None = None
    tolerations: tuple[Toleration, ...] | None = None
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    storage: Storage = field(default_factory=Storage)
    publish: PublishSpec = field(default_factory=PublishSpec)
    suspend: bool = False
    active_deadline_seconds: int | None = None
    backoff_limit: int = 3
    ttl_seconds_after_finished: int | None = None

    def claims(self) -> dict[str, str]:
        """Every PersistentVolumeClaim the workers read, by the spec path that names it first."""
        locations = {**self.dataset.locations()}
        if self.base_model.uri:
            locations["spec.baseModel.uri"] = self.base_model.uri
        if self.base_model.tokenizer:
            locations["spec.baseModel.tokenizer"] = self.base_model.tokenizer
        found: dict[str, str] = {}
        for path, location in locations.items():
            try:
                claim = claim_of(location)
            except LocationError as e:
                raise SettingsError(f"{path}: {e}") from e
            if claim and claim not in found.values():
                found[path] = claim
        return found


def parse_trainingjob(spec: Any) -> TrainingJobSpec:
    """The typed spec; SettingsError names the field when the object does not fit."""
    return load(TrainingJobSpec, spec, "spec")


@dataclass(frozen=True)
class Autoscaling:
    engine: Literal["builtin", "keda", "none"] = "builtin"
    min_replicas: int = 1
    max_replicas: int = 4
    target_queue_length_per_replica: int = 16
    activation_queue_length: int = 0
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise SettingsError("minReplicas must not exceed maxReplicas")


@dataclass(frozen=True)
class AuthSecretRef:
    name: str
    key: str = "token"


@dataclass(frozen=True)
class Gateway:
    enabled: bool = True
    replicas: int = 1
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    auth_secret_ref: AuthSecretRef | None = None


@dataclass(frozen=True)
class LanguageModelSpec:
    model: ModelRef
    image: str | None = None
    resources: ServingResources = field(default_factory=ServingResources)
    node_selector: dict[str, str] | None = None
    tolerations: tuple[Toleration, ...] | None = None
    generation: Generation = field(default_factory=Generation)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    batching: Batching = field(default_factory=Batching)
    queue: Queue = field(default_factory=Queue)
    cache: Cache = field(default_factory=Cache)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    gateway: Gateway = field(default_factory=Gateway)
    suspend: bool = False

    def __post_init__(self) -> None:
        if self.generation.max_new_tokens > self.limits.max_new_tokens:
            raise SettingsError("spec.generation.maxNewTokens must not exceed spec.limits.maxNewTokens")


def parse_languagemodel(spec: Any) -> LanguageModelSpec:
    """The typed spec; SettingsError names the field when the object does not fit."""
    return load(LanguageModelSpec, spec, "spec")
