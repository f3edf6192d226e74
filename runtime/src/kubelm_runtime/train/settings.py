"""The training configuration: the TrainingJob spec plus what only the pod knows.

Defaults equal the CRD's (a test keeps them in step), so a file written by hand
behaves like a TrainingJob with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubelm_contract.settings import SettingsError

from ..config import ModelSource


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


@dataclass(frozen=True)
class Dataset:
    train: str
    validation: str | None = None
    test: str | None = None
    format: Literal["text", "jsonl"] = "text"
    text_field: str = "text"


@dataclass(frozen=True)
class Hyperparameters:
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 0.00005
    warmup_steps: int = 0
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    eval_interval_steps: int = 500

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.max_steps is None or self.max_steps >= 1, "maxSteps must be at least 1")
        _require(self.batch_size >= 1, "batchSize must be at least 1")
        _require(self.gradient_accumulation_steps >= 1, "gradientAccumulationSteps must be at least 1")
        _require(0 < self.learning_rate <= 1, "learningRate must be in (0, 1]")
        _require(self.warmup_steps >= 0, "warmupSteps must not be negative")
        _require(0 <= self.weight_decay <= 1, "weightDecay must be in [0, 1]")
        _require(self.max_grad_norm >= 0, "maxGradNorm must not be negative")
        _require(8 <= self.max_length <= 131072, "maxLength must be in [8, 131072]")
        _require(self.eval_interval_steps >= 0, "evalIntervalSteps must not be negative")


@dataclass(frozen=True)
class Checkpointing:
    interval_steps: int = 200
    keep: int = 2

    def __post_init__(self) -> None:
        _require(self.interval_steps >= 1, "checkpointing.intervalSteps must be at least 1")
        _require(self.keep >= 1, "checkpointing.keep must be at least 1")


@dataclass(frozen=True)
class Publish:
    artifact_cache: bool = True
    name: str | None = None
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
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    publish: Publish = field(default_factory=Publish)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_interval_steps: int = 10
    progress_interval_seconds: float = 5.0

    def __post_init__(self) -> None:
        _require("/" in self.job_id, f"jobId must be <namespace>/<name>, got {self.job_id!r}")

    @property
    def artifact_name(self) -> str:
        return self.publish.name or self.job_id
