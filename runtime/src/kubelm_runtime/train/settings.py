"""The training configuration: the TrainingJob spec plus what only the pod knows.

Defaults equal the CRD's (a test keeps them in step), so a file written by hand
behaves like a TrainingJob with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubelm_contract.settings import SettingsError
from kubelm_contract.training import Checkpointing, Dataset, Hyperparameters, PublishSpec

from ..config import ModelSource

__all__ = ["Checkpointing", "Dataset", "Hyperparameters", "Publish", "TrainConfig"]


@dataclass(frozen=True)
class Publish(PublishSpec):
    max_bytes: int = 4 * 1024**3
    chunk_bytes: int = 4 * 1024**2
    retry_seconds: float = 300.0
    """How long publishing keeps retrying while Redis is unreachable."""


@dataclass(frozen=True)
class TrainConfig:
    base_model: ModelSource
    dataset: Dataset
    output_dir: str
    """Checkpoints, the tokenized-data cache, metrics and the final model go here."""
    job_id: str = "local/train"
    """<namespace>/<name>: names the progress key and, by default, the artifact."""
    incarnation: str | None = None
    """The TrainingJob's metadata.uid: tells this run from an earlier object of the same name. It stamps
    checkpoints and progress, and a checkpoint stamped otherwise is never resumed. None (a run by hand, an
    older operator) stamps nothing."""
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    publish: Publish = field(default_factory=Publish)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_interval_steps: int = 10
    progress_interval_seconds: float = 5.0

    def __post_init__(self) -> None:
        if "/" not in self.job_id:
            raise SettingsError(f"jobId must be <namespace>/<name>, got {self.job_id!r}")
        if self.incarnation == "":
            raise SettingsError("incarnation must not be empty: leave it out to stamp nothing")

    @property
    def artifact_name(self) -> str:
        return self.publish.name or self.job_id
