"""The runtime's only door to Memcached: response-cache entries of models whose `cache.responses.backend`
is memcached.

Entries are the same JSON documents under the same keys as in Redis. Failures leave here as the store
errors of `redis_store`, so `OptionalMemcached` rests after an outage exactly as `OptionalRedis` does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from pymemcache.client.base import PooledClient
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from .redis_store import BlockingOptional, OptionalService, StoreError, StoreUnavailable

DEFAULT_PORT = 11211


@contextlib.contextmanager
def _store_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (TimeoutError, OSError, MemcacheUnexpectedCloseError) as e:
        raise StoreUnavailable(f"memcached at {url}: {type(e).__name__}: {e}") from e
    except MemcacheError as e:
        raise StoreError(f"memcached at {url}: {type(e).__name__}: {e}") from e


class MemcachedStore:
    """A pool of connections (the gateway looks up from several threads at once)."""

    def __init__(self, url: str, timeout: float = 0.5, pool_size: int = 8):
        parts = urlsplit(url)
        if parts.scheme != "memcached" or not parts.hostname:
            raise ValueError(f"expected memcached://host[:port], got {url!r}")
        self.url = url
        self._client = PooledClient((parts.hostname, parts.port or DEFAULT_PORT), connect_timeout=timeout,
                                    timeout=timeout, no_delay=True, max_pool_size=pool_size)

    def get_json_all_or_none(self, keys: Sequence[str]) -> list[Any] | None:
        """The documents at every key in one exchange, or None if one is missing."""
        with _store_errors(self.url):
            found = self._client.get_many(list(dict.fromkeys(keys)))
        if not all(k in found for k in keys):
            return None
        return [json.loads(found[k]) for k in keys]

    def set_json(self, key: str, value: Any, ttl_seconds: int) -> None:
        with _store_errors(self.url):
            stored = self._client.set(key, json.dumps(value, separators=(",", ":")).encode(), expire=ttl_seconds,
                                      noreply=False)
        if not stored:
            raise StoreError(f"memcached at {self.url} did not store {key}")

    def close(self) -> None:
        self._client.close()


class OptionalMemcached(BlockingOptional[MemcachedStore]):
    __doc__ = OptionalService.__doc__
    system = "memcached"

    def __init__(self, url: str | None, purpose: str, timeout: float = 0.5, retry_after: float = 30.0):
        super().__init__(bool(url), purpose, retry_after)
        self.store = MemcachedStore(url, timeout=timeout) if url else None
