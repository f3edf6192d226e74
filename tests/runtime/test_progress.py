from __future__ import annotations

import time

import pytest

from kubelm_contract import keys
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime.progress import ProgressReporter
from kubelm_runtime.redis_store import RedisStore

pytestmark = pytest.mark.services


def test_reporter_survives_an_outage_and_recovers(private_redis: RedisServer) -> None:
    reporter = ProgressReporter(private_redis.url, "ns/job", min_interval=0, retry_after=0.5)
    assert reporter.report({"step": 1})
    assert RedisStore(private_redis.url).get_json(keys.progress("ns/job"))["step"] == 1

    private_redis.stop()
    started = time.monotonic()
    assert not reporter.report({"step": 2})
    assert not reporter.report({"step": 3})  # inside the retry window: not even tried
    assert time.monotonic() - started < 2

    private_redis.start()
    time.sleep(0.6)
    assert reporter.report({"step": 4})
    assert RedisStore(private_redis.url).get_json(keys.progress("ns/job"))["step"] == 4


def test_without_redis_nothing_is_sent() -> None:
    assert not ProgressReporter(None, "ns/job").report({"step": 1}, force=True)
