"""Runtime configuration shared by every subcommand: the model source and file loading.

A configuration is one JSON or YAML document (path in KUBELM_CONFIG or --config)
whose keys mirror the CRD specs; connection URLs come from the environment.
docs/runtime-contract.md is the reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubelm_contract import env
from kubelm_contract.registry import describe_hub
from kubelm_contract.settings import SettingsError, load
from kubelm_contract.training import HubModel

__all__ = ["HubModel", "ModelSource", "load_config", "read_document"]

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of hub, uri or artifact (the operator turns trainingJobRef into artifact)."""

    hub: HubModel | None = None
    uri: str | None = None
    artifact: str | None = None
    """artifact://<name>[@<version>] in the Redis artifact cache."""
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("hub", "uri", "artifact") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SettingsError(f"needs exactly one of hub, uri or artifact (got {', '.join(given) or 'none'})")
        if self.artifact is not None and not self.artifact.startswith("artifact://"):
            raise SettingsError(f"artifact must look like artifact://<name>[@<version>], got {self.artifact!r}")

    def describe(self) -> str:
        if self.hub:
            return describe_hub(self.hub.id, self.hub.revision)
        return str(self.uri or self.artifact)


def read_document(path: str | Path) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SettingsError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: {e}") from e


def load_config(cls: type[T], path: str | Path | None = None) -> T:
    """Reads the configuration file named by `path` or KUBELM_CONFIG into `cls`."""
    path = path or os.environ.get(env.CONFIG_FILE)
    if not path:
        raise SettingsError(f"no configuration: pass --config or set {env.CONFIG_FILE}")
    if not Path(path).is_file():
        raise SettingsError(f"configuration file {path} does not exist")
    return load(cls, read_document(path))
