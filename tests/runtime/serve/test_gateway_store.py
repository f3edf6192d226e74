"""The gateway's Redis store on a real Redis, including one that stops answering."""

from __future__ import annotations

import asyncio

import pytest

from kubelm_contract import keys
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime.redis_store import RedisStore
from kubelm_runtime.serve.completions import RedisGatewayStore
from support import forwarded

pytestmark = pytest.mark.services


def test_registry_results_and_an_unreachable_redis(private_redis: RedisServer) -> None:
    RedisStore(private_redis.url).hset_json(keys.MODEL_REGISTRY, "team/tiny", {"queue": "q"})
    store = RedisGatewayStore(private_redis.url)

    async def scenario() -> None:
        assert await store.registry() == {"team/tiny": {"queue": "q"}}
        assert await store.registry_entry("team/tiny") == {"queue": "q"}
        assert await store.put_result("kubelm:v1:result:x", {"status": "pending"}, 60)
        assert await store.result("kubelm:v1:result:x") == {"status": "pending"}
        private_redis.stop()
        assert await store.registry_entry("team/tiny") is None
        assert not store.available
        assert not await store.put_result("kubelm:v1:result:y", {"status": "pending"}, 60)

    asyncio.run(scenario())


def test_a_silent_redis_holds_up_its_caller_not_the_event_loop(private_redis: RedisServer) -> None:
    """Redis accepts the connection and never answers (a hung server, a black-holed network): the
    lookup waits out its socket timeout without blocking, and the event loop serves everyone else."""
    with forwarded(private_redis.url) as (forwarder, url):
        store = RedisGatewayStore(url)

        async def scenario() -> None:
            assert await store.registry_entry("team/tiny") is None  # connected, nothing registered
            forwarder.hold_answers()
            lookup = asyncio.create_task(store.registry_entry("team/tiny"))
            await asyncio.sleep(0)  # the lookup runs up to its first wait; a blocking call would finish here
            assert not lookup.done()
            assert await lookup is None  # Redis never answered: the default, after the timeout
            assert not store.available

        asyncio.run(scenario())
