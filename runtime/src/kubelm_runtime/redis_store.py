"""The runtime's only door to Redis.

Everything else talks to Redis through RedisStore, so connection handling,
timeouts and the error type callers catch live in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis


class StoreUnavailable(RuntimeError):
    """Redis could not be reached or timed out; callers decide whether that is fatal."""


class RedisStore:
    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"redis at {self.url}: {e}") from e

    def ping(self) -> bool:
        return bool(self._call(self._client.ping))

    def get(self, key: str) -> bytes | None:
        return self._call(self._client.get, key)  # type: ignore[no-any-return]

    def set(self, key: str, value: bytes | str, ttl_seconds: int | None = None) -> None:
        self._call(self._client.set, key, value, ex=ttl_seconds)

    def get_json(self, key: str) -> Any:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def set_json(self, key: str, value: Any, ttl_seconds: int | None = None) -> None:
        self.set(key, json.dumps(value, separators=(",", ":")), ttl_seconds)

    def incr(self, key: str) -> int:
        return int(self._call(self._client.incr, key))

    def put_many(self, items: Iterable[tuple[str, bytes]], batch: int = 8) -> None:
        """SETs in pipelined batches: one round trip per batch, bounded memory."""
        pipe = self._client.pipeline(transaction=False)
        pending = 0
        for key, value in items:
            pipe.set(key, value)
            pending += 1
            if pending == batch:
                self._call(pipe.execute)
                pending = 0
        if pending:
            self._call(pipe.execute)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(self._call(self._client.mget, list(keys))) if keys else []

    def hset_json(self, name: str, field: str, value: Any) -> None:
        self._call(self._client.hset, name, field, json.dumps(value, separators=(",", ":")))

    def hget_json(self, name: str, field: str) -> Any:
        raw = self._call(self._client.hget, name, field)
        return None if raw is None else json.loads(raw)

    def hdel(self, name: str, field: str) -> int:
        return int(self._call(self._client.hdel, name, field))

    def delete_matching(self, pattern: str) -> int:
        keys = self._call(lambda: list(self._client.scan_iter(match=pattern, count=500)))
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += self._call(self._client.delete, *keys[start:start + 500])
        return deleted

    def close(self) -> None:
        self._client.close()
