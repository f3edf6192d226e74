"""TrainingJob specs as typed objects, read with the contract's settings loader.

The classes mirror crds/trainingjobs.kubelm.io.yaml field by field (a test walks
both); the sections the runtime consumes as they are come from the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kubelm_contract.settings import SettingsError, load
from kubelm_contract.training import Checkpointing, Dataset, HubModel, Hyperparameters, PublishSpec
from kubelm_contract.volumes import LocationError, claim_of


@dataclass(frozen=True)
class TrainingJobRef:
    name: str


@dataclass(frozen=True)
class BaseModel:
    hub: HubModel | None = None
    uri: str | None = None
    training_job_ref: TrainingJobRef | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("hub", "uri", "training_job_ref") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SettingsError("needs exactly one of hub, uri or trainingJobRef")


@dataclass(frozen=True)
class Resources:
    cpu: str | int = "2"
    memory: str | int = "4Gi"
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
    base_model: BaseModel
    dataset: Dataset
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    workers: int = 1
    image: str | None = None
    resources: Resources = field(default_factory=Resources)
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
