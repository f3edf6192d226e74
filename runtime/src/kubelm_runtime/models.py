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
        return local_path(source.uri), None
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
