"""The response cache in a real memcached (Debian's package): entries under the same keys and TTL as in
Redis, hits and misses counted in Redis, and an outage that costs a lookup, never a request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kubelm_contract import keys, protocol
from kubelm_devcluster.standalone import MemcachedServer, RedisServer
from kubelm_runtime.memcached_store import MemcachedStore, OptionalMemcached
from kubelm_runtime.redis_store import AsyncOptionalRedis, OptionalRedis, RedisStore
from kubelm_runtime.serve import response_cache
from support import eventually

pytestmark = pytest.mark.services
CHOICE = protocol.Choice(" fine", "length", 2, 1)


@pytest.fixture
def memcached() -> Iterator[MemcachedServer]:
    with MemcachedServer() as server:
        yield server


def test_entries_live_in_memcached_and_the_counters_in_redis(memcached: MemcachedServer,
                                                            private_redis: RedisServer) -> None:
    redis = RedisStore(private_redis.url)
    cache = response_cache.ResponseCache(OptionalRedis(private_redis.url, "a test"),
                                         OptionalMemcached(memcached.url, "a test"))
    assert cache.lookup("ns/m", ["a", "b"]) is None
    cache.store("ns/m", "a", CHOICE, 60)
    assert cache.lookup("ns/m", ["a", "b"]) is None  # every prompt or none
    cache.store("ns/m", "b", CHOICE, 60)
    assert cache.lookup("ns/m", ["a", "b"]) == (CHOICE, CHOICE)
    assert MemcachedStore(memcached.url).get_json_all_or_none([keys.response("ns/m", "a")]) == [CHOICE.to_dict()]
    assert redis.get_json(keys.response("ns/m", "a")) is None  # not in Redis
    assert redis._client.hgetall(keys.cache_stats("ns/m")) == {b"hits": b"1", b"misses": b"2"}

    async def from_the_gateway() -> tuple[protocol.Choice, ...] | None:
        found = await response_cache.lookup_in_memcached_async(
            OptionalMemcached(memcached.url, "a test"), AsyncOptionalRedis(private_redis.url, "a test"), "ns/m",
            ["a", "b"])
        # The hit is counted on a task of its own, after the answer: wait for it while the loop runs.
        for _ in range(1000):
            if redis._client.hget(keys.cache_stats("ns/m"), "hits") == b"2":
                break
            await asyncio.sleep(0.01)
        return found
    assert asyncio.run(from_the_gateway()) == (CHOICE, CHOICE)
    assert redis._client.hget(keys.cache_stats("ns/m"), "hits") == b"2"


def test_entries_expire_with_their_ttl_and_garbage_is_a_miss(memcached: MemcachedServer,
                                                            private_redis: RedisServer) -> None:
    cache = response_cache.ResponseCache(OptionalRedis(private_redis.url, "a test"),
                                         OptionalMemcached(memcached.url, "a test"))
    cache.store("ns/m", "short", CHOICE, 1)
    assert cache.lookup("ns/m", ["short"]) == (CHOICE,)
    eventually(lambda: cache.lookup("ns/m", ["short"]) is None, timeout=30, what="the entry expired")
    raw = MemcachedStore(memcached.url)
    raw._client.set(keys.response("ns/m", "junk"), b'{"text": "a", "unexpected": 1}')
    assert cache.lookup("ns/m", ["junk"]) is None and cache.memcached is not None and cache.memcached.available


def test_an_unreachable_memcached_costs_a_lookup_then_rests(memcached: MemcachedServer,
                                                            private_redis: RedisServer) -> None:
    optional = OptionalMemcached(memcached.url, "a test", retry_after=3600)
    cache = response_cache.ResponseCache(OptionalRedis(private_redis.url, "a test"), optional)
    cache.store("ns/m", "a", CHOICE, 60)
    memcached.stop()
    assert cache.lookup("ns/m", ["a"]) is None and not optional.available
    cache.store("ns/m", "b", CHOICE, 60)  # resting: not even tried
    # An outage is neither a hit nor a miss.
    assert RedisStore(private_redis.url)._client.hgetall(keys.cache_stats("ns/m")) == {}
    with pytest.raises(ValueError, match="memcached://"):
        MemcachedStore("redis://localhost:6379")
