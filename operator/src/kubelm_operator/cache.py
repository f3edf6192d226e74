"""The operator's only door to Redis: training progress in, cleanup of the keys it owns.

Redis is the trainer's side channel, never the source of truth: when it cannot be
reached the operator keeps the status it has and tries again on the next tick.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from kubelm_contract import keys

# Writes the operator's fields of a registry entry and keeps the digest a worker measured, atomically:
# a worker registering itself at the same moment can neither lose nor overwrite the other's part.
_REGISTER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local entry = cjson.decode(ARGV[2])
if current then
  local previous = cjson.decode(current)
  if previous['digest'] and not entry['digestKnown'] then entry['digest'] = previous['digest'] end
end
entry['digestKnown'] = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return 1
"""


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error; the message says which."""


class Cache:
    def __init__(self, url: str | None, timeout: float = 2.0, connections: int = 4):
        self.url = url
        # A few connections shared by every reconciliation: a burst of new objects waits for one instead of
        # opening a connection each (the default pool has no bound). from_pool: the client closes the pool.
        self._client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=10 * timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=30)) if url else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def progress(self, job_id: str) -> dict[str, Any] | None:
        """The trainer's latest progress document, or None when it has written none."""
        if self._client is None:
            return None
        try:
            raw = await self._client.get(keys.progress(job_id))
        except RedisError as e:
            raise CacheUnavailable(f"reading training progress from Redis: {e}") from e
        if raw is None:
            return None
        try:
            document = json.loads(raw)
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    async def delete_progress(self, job_id: str) -> bool:
        """Removes a job's progress key; True when there was one."""
        if self._client is None:
            return False
        try:
            return bool(await self._client.delete(keys.progress(job_id)))
        except RedisError as e:
            raise CacheUnavailable(f"deleting the training progress key from Redis: {e}") from e

    async def register_model(self, model_id: str, entry: dict[str, Any], digest_known: bool) -> None:
        """Writes a model's routing entry for the gateway. Without `digest_known` the digest a worker
        already recorded (from the files it loaded) is kept."""
        if self._client is None:
            return
        try:
            await self._client.eval(_REGISTER, 1, keys.MODEL_REGISTRY, model_id,  # type: ignore[misc]
                                    json.dumps({**entry, "digestKnown": digest_known}))
        except RedisError as e:
            raise CacheUnavailable(f"writing the model registry entry to Redis: {e}") from e

    async def registry_entry(self, model_id: str) -> dict[str, Any] | None:
        if self._client is None:
            return None
        try:
            raw = await self._client.hget(keys.MODEL_REGISTRY, model_id)  # type: ignore[misc]
        except RedisError as e:
            raise CacheUnavailable(f"reading the model registry from Redis: {e}") from e
        return json.loads(raw) if raw else None

    async def cache_counters(self, model_id: str) -> dict[str, int]:
        """The response cache's hits and misses for a model."""
        if self._client is None:
            return {}
        try:
            raw = await self._client.hgetall(keys.cache_stats(model_id))  # type: ignore[misc]
        except RedisError as e:
            raise CacheUnavailable(f"reading the response cache counters from Redis: {e}") from e
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    async def delete_model(self, model_id: str, *, registry: bool, responses: bool) -> int:
        """Removes what Redis holds for a model: its registry entry, and its cached responses and counters."""
        if self._client is None:
            return 0
        try:
            removed = 0
            if registry:
                removed += int(await self._client.hdel(keys.MODEL_REGISTRY, model_id))  # type: ignore[misc]
            if responses:
                batch: list[Any] = []
                async for key in self._client.scan_iter(match=keys.response_pattern(model_id), count=500):
                    batch.append(key)
                    if len(batch) == 500:
                        removed += int(await self._client.delete(*batch))
                        batch = []
                if batch:
                    removed += int(await self._client.delete(*batch))
                removed += int(await self._client.delete(keys.cache_stats(model_id)))
            return removed
        except RedisError as e:
            raise CacheUnavailable(f"deleting the model's keys from Redis: {e}") from e
