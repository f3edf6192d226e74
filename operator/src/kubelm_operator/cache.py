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


class CacheUnavailable(Exception):
    """Redis could not be reached or answered with an error; the message says which."""


class Cache:
    def __init__(self, url: str | None, timeout: float = 2.0):
        self.url = url
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            health_check_interval=30) if url else None

    @property
    def configured(self) -> bool:
        return self._client is not None

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
