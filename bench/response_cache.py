"""Response-cache hit latency: Memcached against Redis, measured in the same run.

Private redis-server and memcached on loopback; the same entries stored in both; then alternating rounds
of hits through each backend, as a worker looks up (blocking) and as the gateway does (asyncio: Redis
through redis.asyncio, Memcached on a thread). Memcached hits also count the hit in Redis, as the
response cache does. Prints p50/p90 per path and each Memcached figure as a ratio of Redis's.

    python bench/response_cache.py [--hits 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kubelm_contract import protocol
from kubelm_devcluster.standalone import MemcachedServer, RedisServer
from kubelm_runtime.memcached_store import OptionalMemcached
from kubelm_runtime.redis_store import AsyncOptionalRedis, OptionalRedis
from kubelm_runtime.serve import response_cache

MODEL = "bench/tiny"
CHOICE = protocol.Choice(" once upon a time there was a fox who lived by the river", "length", 8, 16)


def timed(lookup: Callable[[], object], hits: int) -> list[float]:
    samples = []
    for _ in range(hits):
        started = time.perf_counter()
        assert lookup() is not None
        samples.append(time.perf_counter() - started)
    return samples


async def timed_async(lookup: Callable[[], Awaitable[object]], hits: int) -> list[float]:
    samples = []
    for _ in range(hits):
        started = time.perf_counter()
        assert await lookup() is not None
        samples.append(time.perf_counter() - started)
    return samples


def quantiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=10)
    return statistics.median(samples) * 1e6, cuts[8] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server, \
            MemcachedServer() as memcached_server:
        redis = OptionalRedis(redis_server.url, "bench")
        in_redis = response_cache.ResponseCache(redis)
        in_memcached = response_cache.ResponseCache(redis, OptionalMemcached(memcached_server.url, "bench"))
        material = ["m0"]
        in_redis.store(MODEL, material[0], CHOICE, 3600)
        in_memcached.store(MODEL, material[0], CHOICE, 3600)
        gateway_redis = AsyncOptionalRedis(redis_server.url, "bench")
        gateway_memcached = OptionalMemcached(memcached_server.url, "bench")
        results: dict[str, list[float]] = {k: [] for k in ("worker redis", "worker memcached",
                                                            "gateway redis", "gateway memcached")}

        async def gateway_round() -> None:
            results["gateway redis"] += await timed_async(
                lambda: response_cache.lookup_async(gateway_redis, MODEL, material), args.hits)
            results["gateway memcached"] += await timed_async(
                lambda: response_cache.lookup_in_memcached_async(gateway_memcached, gateway_redis, MODEL, material),
                args.hits)

        async def rounds() -> None:  # one event loop: the asyncio Redis client belongs to it
            for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both alike
                results["worker redis"] += timed(lambda: in_redis.lookup(MODEL, material), args.hits)
                results["worker memcached"] += timed(lambda: in_memcached.lookup(MODEL, material), args.hits)
                await gateway_round()

        asyncio.run(rounds())
        print(f"response-cache hits, {args.rounds} x {args.hits} per path (one entry of {len(CHOICE.text)} chars)")
        for side in ("worker", "gateway"):
            base = quantiles(results[f"{side} redis"])
            other = quantiles(results[f"{side} memcached"])
            print(f"  {side:8s} redis      p50 {base[0]:7.1f} us  p90 {base[1]:7.1f} us")
            print(f"  {side:8s} memcached  p50 {other[0]:7.1f} us  p90 {other[1]:7.1f} us  "
                  f"({other[0] / base[0]:.2f}x redis at p50, counter in Redis included)")


if __name__ == "__main__":
    main()
