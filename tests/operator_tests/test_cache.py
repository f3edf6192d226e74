"""The operator's Redis module against the real Redis: the registry entry it shares with workers,
counters, and removing what a model leaves behind."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis

from kubelm_contract import keys
from kubelm_operator.cache import Cache, CacheUnavailable
from support import ClusterEnv

pytestmark = [pytest.mark.services, pytest.mark.cluster]


def test_registry_entry_keeps_the_digest_a_worker_measured(cluster: ClusterEnv) -> None:
    model = f"t-{uuid.uuid4().hex[:6]}/gpt2"
    client = redis.Redis.from_url(cluster.redis_url)
    entry: dict[str, Any] = {"queue": "kubelm.q", "namespace": "t", "source": "hub:gpt2@main",
                             "digest": "source:hub:gpt2@main", "status": "Loading"}

    async def scenario() -> None:
        cache = Cache(cluster.redis_url)
        try:
            await cache.register_model(model, entry, digest_known=False)
            assert await cache.registry_entry(model) == entry
            # A worker registers with the digest of the files it loaded...
            client.hset(keys.MODEL_REGISTRY, model, json.dumps({**entry, "digest": "sha256:abc", "status": "Ready"}))
            # ...and the operator's next write keeps it, unless the operator knows the digest itself.
            await cache.register_model(model, {**entry, "status": "Ready"}, digest_known=False)
            assert (await cache.registry_entry(model) or {})["digest"] == "sha256:abc"
            await cache.register_model(model, {**entry, "digest": "sha256:new"}, digest_known=True)
            assert (await cache.registry_entry(model) or {})["digest"] == "sha256:new"
            assert "digestKnown" not in (await cache.registry_entry(model) or {})

            client.hset(keys.cache_stats(model), mapping={"hits": 3, "misses": 5})
            for i in range(3):
                client.set(keys.response(model, f"m{i}"), "x")
            other = keys.response(model + "-other", "m0")
            client.set(other, "kept")
            assert await cache.cache_counters(model) == {"hits": 3, "misses": 5}
            assert await cache.delete_model(model, registry=True, responses=False) == 1
            assert await cache.registry_entry(model) is None
            assert await cache.delete_model(model, registry=True, responses=True) == 4
            assert client.get(other) == b"kept" and await cache.cache_counters(model) == {}
            client.delete(other)
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_unreachable_redis_is_reported() -> None:
    async def scenario() -> None:
        cache = Cache("redis://127.0.0.1:1/0", timeout=1)
        try:
            with pytest.raises(CacheUnavailable, match="model registry entry"):
                await cache.register_model("a/b", {}, digest_known=False)
        finally:
            await cache.close()
    asyncio.run(scenario())
