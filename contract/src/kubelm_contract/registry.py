"""The model registry entry (`keys.MODEL_REGISTRY`): the gateway's routing table, written by workers and
by the operator, read by the gateway. Its shape lives here once."""

from __future__ import annotations

import dataclasses
from typing import Any

from .protocol import OPTIONAL_PARAMS, Decoding, Limits


def describe_hub(repository: str, revision: str) -> str:
    """How a hub model is named in the registry and in status."""
    return f"hub:{repository}@{revision}"


def source_digest(description: str) -> str:
    """The digest of a model without a kubelm manifest: its source, so response cache keys still separate models."""
    return f"source:{description}"


def model_entry(*, queue: str, namespace: str, digest: str | None, source: str, limits: Limits,
                defaults: Decoding, response_cache: bool, phase: str | None = None,
                response_cache_backend: str = "redis") -> dict[str, Any]:
    entry: dict[str, Any] = {
        "queue": queue, "namespace": namespace, "digest": digest, "source": source,
        "maxNewTokens": limits.max_new_tokens, "maxInputTokens": limits.max_input_tokens,
        # Log-probabilities and OpenAI's penalties are asked per request, never a model's default.
        "defaults": {**{k: v for k, v in dataclasses.asdict(defaults).items()
                        if k not in {name for name, _ in OPTIONAL_PARAMS}},
                     "stop": list(defaults.stop)},
        "responseCache": response_cache,
    }
    if response_cache_backend != "redis":  # entries written before the field existed read as redis
        entry["responseCacheBackend"] = response_cache_backend
    if phase is not None:
        entry["status"] = phase
    return entry
