"""The TrainingJob spec sections the runtime's training configuration carries as they are.

The operator parses a TrainingJob's spec with these classes and writes them into the
training ConfigMap; the runtime reads the same classes back from that file. Names and
defaults equal the CRD's (tests keep them in step), so one definition serves both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .settings import SettingsError

OUTPUT_DIR = "/var/lib/kubelm/job"
"""Where a training pod's checkpoints and final model go (the storage volume's mount)."""
CONFIG_DIR = "/etc/kubelm"
CONFIG_FILE_NAME = "train.json"
"""The training configuration inside the ConfigMap, mounted at CONFIG_DIR."""
CACHE_DIR = "/var/cache/kubelm"
"""Writable cache of the runtime image (Hugging Face files, fetched artifacts)."""
RENDEZVOUS_PORT = 29500
"""MASTER_PORT of data-parallel training: rank 0 listens here."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


@dataclass(frozen=True)
class HubModel:
    id: str
    revision: str = "main"


@dataclass(frozen=True)
class Dataset:
    train: str
    validation: str | None = None
    test: str | None = None
    format: Literal["text", "jsonl"] = "text"
    text_field: str = "text"

    def locations(self) -> dict[str, str]:
        """spec path -> location, for every file the job reads."""
        return {f"spec.dataset.{k}": v for k, v in
                (("train", self.train), ("validation", self.validation), ("test", self.test)) if v}


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
class PublishSpec:
    """The TrainingJob's publish section; the runtime adds transfer settings to it."""

    artifact_cache: bool = True
    name: str | None = None
