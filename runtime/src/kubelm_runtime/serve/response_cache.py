"""The response cache shared by workers (fill and look up) and the gateway (look up first).

Only deterministic requests are cached (greedy, or sampled with a seed); the key
covers the model's content digest, the normalised prompt and every decoding
parameter, so a new model version or other parameters never hit an old entry.
"""

from __future__ import annotations

from typing import Any

from kubelm_contract import keys, protocol
from kubelm_contract.protocol import Choice, Decoding

from ..redis_store import AsyncOptionalRedis, AsyncRedisStore, OptionalRedis, RedisStore


def materials(digest: str, prompts: tuple[str, ...], decoding: Decoding, n: int = 1) -> list[str] | None:
    """Cache key material per prompt, or None when the request is not cacheable (sampled without a
    seed, several completions per prompt: an entry holds one, or log-probabilities asked for: an entry
    holds text)."""
    if not decoding.deterministic or n != 1 or decoding.logprobs is not None:
        return None
    return [protocol.cache_key_material(digest, p, decoding) for p in prompts]


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
