"""The runtime's only door to Redis.

Everything else talks to Redis through RedisStore, so connection handling,
timeouts and the error type callers catch live in one place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S")


class StoreError(RuntimeError):
    """Redis answered with an error (out of memory under maxmemory, READONLY after a failover, a wrong
    type) or held a document that is not what was stored there."""


class StoreUnavailable(StoreError):
    """Redis could not be reached or timed out; callers decide whether that is fatal."""


# KEYS[1]: a stats hash; KEYS[2..]: documents. All of them, or nil when one is missing; counts hits/misses.
LOOKUP_ALL_OR_NONE = """
local found = redis.call('MGET', unpack(KEYS, 2))
for i = 1, #found do
  if not found[i] then
    redis.call('HINCRBY', KEYS[1], 'misses', 1)
    return nil
  end
end
redis.call('HINCRBY', KEYS[1], 'hits', 1)
return found
"""


@contextlib.contextmanager
def _store_errors(url: str) -> Iterator[None]:
    """redis-py's errors, blocking or asyncio, as the two this module's callers catch."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise StoreUnavailable(f"redis at {url}: {e}") from e
    except redis.RedisError as e:
        raise StoreError(f"redis at {url}: {type(e).__name__}: {e}") from e


def _json_or_none(raw: bytes | None) -> Any:
    return None if raw is None else json.loads(raw)


class RedisStore:
    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)
        self._lookup = self._client.register_script(LOOKUP_ALL_OR_NONE)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with _store_errors(self.url):
            return fn(*args, **kwargs)

    def ping(self) -> bool:
        return bool(self._call(self._client.ping))

    def get(self, key: str) -> bytes | None:
        return self._call(self._client.get, key)  # type: ignore[no-any-return]

    def set(self, key: str, value: bytes | str, ttl_seconds: int | None = None) -> None:
        self._call(self._client.set, key, value, ex=ttl_seconds)

    def get_json(self, key: str) -> Any:
        return _json_or_none(self.get(key))

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

    def get_json_all_or_none(self, keys: Sequence[str], stats: str) -> list[Any] | None:
        """The JSON documents at every key, or None if one is missing; counts a hit or a miss in the
        `stats` hash. One round trip (a server-side script), so a cache hit costs a single exchange."""
        found = self._call(self._lookup, keys=[stats, *keys])
        return None if found is None else [json.loads(raw) for raw in found]

    def hset_json(self, name: str, field: str, value: Any) -> None:
        self._call(self._client.hset, name, field, json.dumps(value, separators=(",", ":")))

    def count(self, name: str, field: str) -> None:
        self._call(self._client.hincrby, name, field, 1)

    def hget_json(self, name: str, field: str) -> Any:
        return _json_or_none(self._call(self._client.hget, name, field))

    def hgetall_json(self, name: str) -> dict[str, Any]:
        raw = self._call(self._client.hgetall, name)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

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


class AsyncRedisStore:
    """RedisStore's calls for asyncio code (redis.asyncio): the gateway's event loop waits for Redis
    without blocking, at the cost of a synchronous call (a thread hop would double it)."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url
        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)
        self._lookup = self._client.register_script(LOOKUP_ALL_OR_NONE)

    async def _call(self, pending: Awaitable[Any]) -> Any:
        with _store_errors(self.url):
            return await pending

    async def get_json(self, key: str) -> Any:
        return _json_or_none(await self._call(self._client.get(key)))

    async def set_json(self, key: str, value: Any, ttl_seconds: int | None = None) -> None:
        await self._call(self._client.set(key, json.dumps(value, separators=(",", ":")), ex=ttl_seconds))

    async def hget_json(self, name: str, field: str) -> Any:
        return _json_or_none(await self._call(self._client.hget(name, field)))  # type: ignore[arg-type]

    async def hgetall_json(self, name: str) -> dict[str, Any]:
        raw = await self._call(self._client.hgetall(name))  # type: ignore[arg-type]
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def count(self, name: str, field: str) -> None:
        await self._call(self._client.hincrby(name, field, 1))  # type: ignore[misc]

    async def get_json_all_or_none(self, keys: Sequence[str], stats: str) -> list[Any] | None:
        """As RedisStore.get_json_all_or_none: one round trip, a hit or a miss counted in `stats`."""
        found = await self._call(self._lookup(keys=[stats, *keys]))
        return None if found is None else [json.loads(raw) for raw in found]


class OptionalService:
    """A store (Redis here, Memcached in memcached_store) as an optional helper: while it is unreachable
    calls return a default at once, and it is tried again after a quiet period, so callers (training,
    serving) never stall on it. An error answer or a malformed document fails that one call (the default,
    and a warning): the next may succeed."""

    system = "redis"

    def __init__(self, configured: bool, purpose: str, retry_after: float):
        self.configured = configured
        self.purpose = purpose
        self.retry_after = retry_after
        self._down_since: float | None = None
        self._warned_at: float | None = None

    def _warn(self, error: Exception) -> None:
        """At most one warning per quiet period: a Redis out of memory fails every write."""
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.retry_after:
            self._warned_at = now
            log.warning("%s call failed, continuing without it for %s: %s: %s", self.system, self.purpose,
                        type(error).__name__, error)

    @property
    def available(self) -> bool:
        return self.configured and self._down_since is None

    def _resting(self, force: bool) -> bool:
        """Whether to skip Redis now: not configured, or unreachable within the quiet period."""
        if not self.configured:
            return True
        return not force and self._down_since is not None and time.monotonic() - self._down_since < self.retry_after

    def _failed(self, error: Exception) -> None:
        if isinstance(error, StoreUnavailable):
            if self._down_since is None:
                log.warning("%s unavailable, continuing without %s: %s", self.system, self.purpose, error)
            self._down_since = time.monotonic()
        else:  # an error reply; a document not in the expected shape
            self._warn(error)

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.info("%s is back: %s resumes", self.system, self.purpose)
            self._down_since = None


class BlockingOptional(OptionalService, Generic[S]):
    """An OptionalService called from blocking code, around a store of type S."""

    store: S | None

    def call(self, fn: Callable[[S], T], default: T, force: bool = False) -> T:
        if self.store is None or self._resting(force):
            return default
        try:
            result = fn(self.store)
        except (StoreError, ValueError, TypeError) as e:
            self._failed(e)
            return default
        self._succeeded()
        return result


class OptionalRedis(BlockingOptional[RedisStore]):
    __doc__ = OptionalService.__doc__

    def __init__(self, url: str | None, purpose: str, timeout: float = 0.5, retry_after: float = 30.0):
        super().__init__(bool(url), purpose, retry_after)
        self.store = RedisStore(url, timeout=timeout) if url else None


class AsyncOptionalRedis(OptionalService):
    """OptionalRedis for asyncio code."""

    def __init__(self, url: str | None, purpose: str, timeout: float = 0.5, retry_after: float = 30.0):
        super().__init__(bool(url), purpose, retry_after)
        self.store = AsyncRedisStore(url, timeout=timeout) if url else None

    async def call(self, fn: Callable[[AsyncRedisStore], Awaitable[T]], default: T, force: bool = False) -> T:
        if self.store is None or self._resting(force):
            return default
        try:
            result = await fn(self.store)
        except (StoreError, ValueError, TypeError) as e:
            self._failed(e)
            return default
        self._succeeded()
        return result
