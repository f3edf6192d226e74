"""The response cache shared by workers (fill and look up) and the gateway (look up first).

Only deterministic requests are cached (greedy, or sampled with a seed); the key
covers the model's content digest, the normalised prompt and every decoding
parameter, so a new model version or other parameters never hit an old entry.
Entries live in Redis, or in Memcached for models whose `cache.responses.backend`
says so (same keys, documents and TTL); hits and misses are counted in Redis either way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from kubelm_contract import keys, protocol
from kubelm_contract.protocol import Choice, Request

from ..memcached_store import MemcachedStore, OptionalMemcached
from ..redis_store import AsyncOptionalRedis, AsyncRedisStore, OptionalRedis, RedisStore

MISSING = object()
"""What a Memcached lookup answers while Memcached is unreachable: neither a hit nor a miss."""


def materials(digest: str, request: Request) -> list[str] | None:
    """Cache key material per row of the request (`n` per prompt, in choice order), or None when it is
    not cacheable (sampled without a seed, or log-probabilities asked for: an entry holds text). A row's
    key covers its own decoding, so the samples of a seeded request (seeds s, s + 1, ...) have entries of
    their own, and a greedy request's `n` identical rows share one."""
    if not request.decoding.deterministic or request.decoding.logprobs is not None:
        return None
    return [protocol.cache_key_material(digest, prompt, decoding) for prompt, decoding in request.samples()]


def _choices(documents: list[Any] | None) -> tuple[Choice, ...] | None:
    # Built inside the Redis call: a malformed entry is a miss, not a crash.
    return None if documents is None else tuple(Choice.from_dict(c) for c in documents)


def lookup(redis: OptionalRedis, model: str, material: list[str]) -> tuple[Choice, ...] | None:
    """The cached choices when every prompt is cached (counted as a hit), else None (a miss)."""
    response_keys = [keys.response(model, m) for m in material]

    def found(store: RedisStore) -> tuple[Choice, ...] | None:
        return _choices(store.get_json_all_or_none(response_keys, keys.cache_stats(model)))

    return redis.call(found, None)


async def lookup_async(redis: AsyncOptionalRedis, model: str, material: list[str]) -> tuple[Choice, ...] | None:
    """`lookup` for asyncio code."""
    response_keys = [keys.response(model, m) for m in material]

    async def found(store: AsyncRedisStore) -> tuple[Choice, ...] | None:
        return _choices(await store.get_json_all_or_none(response_keys, keys.cache_stats(model)))

    return await redis.call(found, None)


def store(redis: OptionalRedis, model: str, material: str, choice: Choice, ttl_seconds: int) -> None:
    key, document = keys.response(model, material), choice.to_dict()
    redis.call(lambda s: s.set_json(key, document, ttl_seconds), None)


def _found_in(memcached: OptionalMemcached, response_keys: list[str]) -> Any:
    def found(store: MemcachedStore) -> Any:
        return _choices(store.get_json_all_or_none(response_keys))

    return memcached.call(found, MISSING)


@dataclass
class ResponseCache:
    """A worker's response cache: in Redis, or in Memcached when one is given (entries there, counters in
    Redis)."""

    redis: OptionalRedis
    memcached: OptionalMemcached | None = None

    def lookup(self, model: str, material: list[str]) -> tuple[Choice, ...] | None:
        if self.memcached is None:
            return lookup(self.redis, model, material)
        choices = _found_in(self.memcached, [keys.response(model, m) for m in material])
        if choices is MISSING:
            return None
        self.redis.call(lambda s: s.count(keys.cache_stats(model), "hits" if choices else "misses"), None)
        return choices  # type: ignore[no-any-return]

    def store(self, model: str, material: str, choice: Choice, ttl_seconds: int) -> None:
        if self.memcached is None:
            store(self.redis, model, material, choice, ttl_seconds)
            return
        key, document = keys.response(model, material), choice.to_dict()
        self.memcached.call(lambda s: s.set_json(key, document, ttl_seconds), None)


_counting: set[asyncio.Task[None]] = set()
"""Counter updates under way (a reference keeps each task alive until it ends)."""


async def lookup_in_memcached_async(memcached: OptionalMemcached, redis: AsyncOptionalRedis, model: str,
                                    material: list[str]) -> tuple[Choice, ...] | None:
    """The gateway's lookup for a model whose entries live in Memcached: on a thread (pymemcache blocks),
    and the count in Redis on a task of its own, so a hit waits for one store, not two."""
    choices = await asyncio.to_thread(_found_in, memcached, [keys.response(model, m) for m in material])
    if choices is MISSING:
        return None

    async def count(store: AsyncRedisStore) -> None:
        await store.count(keys.cache_stats(model), "hits" if choices else "misses")

    task = asyncio.get_running_loop().create_task(redis.call(count, None))
    _counting.add(task)
    task.add_done_callback(_counting.discard)
    return choices  # type: ignore[no-any-return]
