"""Loading causal LMs and tokenizers through the real from_pretrained path.

A model source is a hub id (downloaded by transformers, or read from its cache
when offline), a directory (a path or pvc:// URI), or an artifact in the Redis
artifact cache, fetched and verified into a local directory first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kubelm_contract.volumes import local_path

from . import artifacts
from .config import ModelSource
from .redis_store import RedisStore

log = logging.getLogger(__name__)


def resolve(source: ModelSource, store: RedisStore | None, cache_dir: Path) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, revision) for a model source."""
    if source.hub:
        return source.hub.id, source.hub.revision
    if source.uri:
        path = local_path(source.uri)
        if not Path(path).is_dir():
            # from_pretrained would take a missing path for a hub id and say something else.
            raise FileNotFoundError(f"no model directory at {path} (from {source.uri})")
        return path, None
    assert source.artifact
    if store is None:
        raise artifacts.ArtifactError(f"{source.artifact} needs Redis: set KUBELM_REDIS_URL")
    name, version = artifacts.parse_artifact_uri(source.artifact)
    described = artifacts.describe(store, name, version)
    target = cache_dir / "artifacts" / name.replace("/", "--") / str(described.version)
    manifest = target / artifacts.MANIFEST_FILE
    if manifest.exists() and artifacts.read_manifest(target).get("digest") == described.digest:
        log.info("artifact %s already in %s", described.uri, target)
    else:
        artifacts.fetch(store, name, target, described.version)
        log.info("fetched %s (%.1f MiB) into %s", described.uri, described.size / 2**20, target)
    return str(target), None


def load_tokenizer(reference: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference, revision=revision)
    if tokenizer.pad_token is None:
        # GPT-2 ships without a pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(reference: str, revision: str | None = None, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference, revision=revision, **kwargs)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line saying why, for people and the operator."""


def load_failure(error: BaseException, source: str) -> ModelLoadError:
    """Sorts a loading error into the reasons a person can act on: missing, corrupt, unsupported, too big."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    lowered = text.lower()
    if isinstance(error, artifacts.ArtifactNotFound | FileNotFoundError) or "does not appear to have" in lowered \
            or "not a local folder and is not a valid model identifier" in lowered or "no such file" in lowered:
        reason = "missing"
    elif isinstance(error, artifacts.ArtifactCorrupt) or "safetensor" in lowered or "deserializ" in lowered \
            or "corrupt" in lowered or "unexpected end" in lowered:
        reason = "corrupt"
    elif "unrecognized configuration" in lowered or "model type" in lowered or "architecture" in lowered:
        reason = "unsupported architecture"
    elif isinstance(error, MemoryError) or "out of memory" in lowered or "not enough memory" in lowered:
        reason = "does not fit in memory"
    else:
        reason = "cannot be loaded"
    return ModelLoadError(f"model {source} {reason}: {text}"[:1000])
