"""The Redis key schema shared by the operator and the runtime.

Every key starts with ``kubelm:v1:`` so a schema change can live beside the old
one. Names that group keys used together are wrapped in braces (Redis Cluster
hash tags) so pipelines over one artifact stay on one shard.
"""

from __future__ import annotations

PREFIX = "kubelm:v1"


def progress(job_id: str) -> str:
    """JSON progress of a training job, written by rank 0 (see runtime-contract.md)."""
    return f"{PREFIX}:progress:{{{job_id}}}"


def artifact_next_version(name: str) -> str:
    """Counter handing out artifact versions (INCR)."""
    return f"{PREFIX}:artifact:{{{name}}}:next-version"


def artifact_manifest(name: str, version: int) -> str:
    """JSON manifest of one artifact version: files, chunk digests, content digest."""
    return f"{PREFIX}:artifact:{{{name}}}:{version}:manifest"


def artifact_chunk(name: str, version: int, index: int) -> str:
    """One chunk of the concatenated artifact files."""
    return f"{PREFIX}:artifact:{{{name}}}:{version}:chunk:{index}"


def artifact_pattern(name: str) -> str:
    """SCAN pattern matching every key of one artifact name (for cleanup)."""
    return f"{PREFIX}:artifact:{{{name}}}:*"


ARTIFACT_REGISTRY = f"{PREFIX}:registry:artifacts"
"""Hash: artifact name -> JSON of its latest complete version (version, digest, size, created)."""


MODEL_REGISTRY = f"{PREFIX}:registry:models"
"""Hash: model id (<namespace>/<name>) -> JSON {queue, namespace, digest, source, ...}: the gateway's routing table."""


def model_id(namespace: str, name: str) -> str:
    """How Redis keys name a served model: LanguageModels of the same name in two namespaces stay apart."""
    return f"{namespace}/{name}"


def response(model: str, material: str) -> str:
    """A cached reply for a deterministic request (material: protocol.cache_key_material)."""
    return f"{PREFIX}:response:{{{model}}}:{material}"


def response_pattern(model: str) -> str:
    return f"{PREFIX}:response:{{{model}}}:*"


def result(request_id: str) -> str:
    """The stored reply of an asynchronous request (or a pending marker)."""
    return f"{PREFIX}:result:{request_id}"


def cache_stats(model: str) -> str:
    """Hash of counters: hits, misses."""
    return f"{PREFIX}:stats:{{{model}}}"
