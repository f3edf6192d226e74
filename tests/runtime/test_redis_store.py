"""Redis trouble other than an outage: error answers and documents not in the shape stored."""

from __future__ import annotations

import asyncio

import pytest

from kubelm_contract import keys, protocol
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime.redis_store import (
    AsyncOptionalRedis,
    AsyncRedisStore,
    OptionalRedis,
    RedisStore,
    StoreError,
    StoreUnavailable,
)
from kubelm_runtime.serve import response_cache

pytestmark = pytest.mark.services


def test_an_error_answer_fails_the_call_not_the_caller(private_redis: RedisServer) -> None:
    admin = RedisStore(private_redis.url)
    optional = OptionalRedis(private_redis.url, "a test", retry_after=3600)
    admin._client.config_set("maxmemory-policy", "noeviction")
    admin._client.config_set("maxmemory", "1")  # every write is refused: OOM
    try:
        with pytest.raises(StoreError, match="OutOfMemoryError") as refused:
            admin.set("k", "v")
        assert not isinstance(refused.value, StoreUnavailable)
        choice = protocol.Choice("text", "stop", 1, 1)
        response_cache.store(optional, "ns/model", "material", choice, 60)  # what a worker does after an ack
        assert optional.call(lambda s: s.set("k", "v") or True, False) is False
    finally:
        admin._client.config_set("maxmemory", "0")
    # An error answer is not an outage: the next call is made at once (no quiet period) and succeeds.
    assert optional.available
    assert optional.call(lambda s: s.set("k", "v") or True, False) is True


def test_a_malformed_cached_response_is_a_miss(private_redis: RedisServer) -> None:
    store, optional = RedisStore(private_redis.url), OptionalRedis(private_redis.url, "a test")
    for garbage in (b"not json", b'{"text": "a", "unexpected": 1}', b"[1, 2]"):
        store.set(keys.response("ns/model", "material"), garbage)
        assert response_cache.lookup(optional, "ns/model", ["material"]) is None
    assert optional.available
    choice = protocol.Choice("text", "stop", 1, 1)
    response_cache.store(optional, "ns/model", "material", choice, 60)
    assert response_cache.lookup(optional, "ns/model", ["material"]) == (choice,)


def test_the_asyncio_door_answers_like_the_blocking_one(private_redis: RedisServer) -> None:
    """The gateway's redis.asyncio calls: the same documents, the same error kinds, the same quiet period."""
    store = RedisStore(private_redis.url)
    optional = AsyncOptionalRedis(private_redis.url, "a test", retry_after=3600)
    choice = protocol.Choice("text", "stop", 1, 1)

    async def scenario() -> None:
        assert await response_cache.lookup_async(optional, "ns/model", ["material"]) is None
        response_cache.store(OptionalRedis(private_redis.url, "a test"), "ns/model", "material", choice, 60)
        assert await response_cache.lookup_async(optional, "ns/model", ["material"]) == (choice,)
        store.set(keys.response("ns/model", "material"), b"not json")
        assert await response_cache.lookup_async(optional, "ns/model", ["material"]) is None
        store._client.config_set("maxmemory-policy", "noeviction")
        store._client.config_set("maxmemory", "1")
        try:
            async_store = AsyncRedisStore(private_redis.url)
            with pytest.raises(StoreError, match="OutOfMemoryError") as refused:
                await async_store.set_json("k", {"v": 1})
            assert not isinstance(refused.value, StoreUnavailable)
        finally:
            store._client.config_set("maxmemory", "0")
        assert optional.available
        assert store.hgetall_json(keys.cache_stats("ns/model")) == {"hits": 2, "misses": 1}
        private_redis.stop()
        assert await optional.call(lambda s: s.get_json("k"), "default") == "default"
        assert not optional.available
        private_redis.start()  # within the quiet period: not tried again unless forced
        assert await optional.call(lambda s: s.get_json("k"), "default") == "default"
        assert await optional.call(lambda s: s.get_json("k"), "default", force=True) is None
        assert optional.available

    asyncio.run(scenario())
