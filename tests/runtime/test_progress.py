from __future__ import annotations

import pytest

from kubelm_contract import keys
from kubelm_devcluster.standalone import RedisServer
from kubelm_runtime.progress import ProgressReporter
from kubelm_runtime.redis_store import RedisStore
from support import eventually

pytestmark = pytest.mark.services


def test_reporter_survives_an_outage_and_recovers(private_redis: RedisServer) -> None:
    reporter = ProgressReporter(private_redis.url, "ns/job", min_interval=0, retry_after=5)
    assert reporter.report({"step": 1})
    store = RedisStore(private_redis.url)
    assert store.get_json(keys.progress("ns/job"))["step"] == 1

    private_redis.stop()
    assert not reporter.report({"step": 2})
    private_redis.start()  # empty: it keeps nothing across a restart
    # Redis is back, but the reporter does not try it again inside its quiet period: nothing is written.
    assert not reporter.report({"step": 3})
    assert store.get_json(keys.progress("ns/job")) is None

    eventually(lambda: reporter.report({"step": 4}), timeout=60, interval=0.2, what="reporting again")
    assert store.get_json(keys.progress("ns/job"))["step"] == 4


def test_without_redis_nothing_is_sent() -> None:
    assert not ProgressReporter(None, "ns/job").report({"step": 1}, force=True)


def test_reports_carry_the_incarnation_when_there_is_one(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    assert ProgressReporter(private_redis.url, "ns/job", min_interval=0, incarnation="uid-1").report(
        {"step": 1, "incarnation": "forged"})
    assert store.get_json(keys.progress("ns/job"))["incarnation"] == "uid-1"
    assert ProgressReporter(private_redis.url, "ns/other", min_interval=0).report({"step": 1})
    assert "incarnation" not in store.get_json(keys.progress("ns/other"))
