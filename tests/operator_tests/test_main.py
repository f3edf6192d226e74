"""The operator's process set-up: which of kopf's log lines are routine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from kubelm_operator.main import quiet_routine_successes


def _record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    before = root.level
    yield root
    root.setLevel(before)


@pytest.mark.parametrize("message", ["Handler 'languagemodel-seen' succeeded.",
                                     "Timer 'languagemodel-tick' succeeded."])
def test_a_routine_success_is_debug(message: str, root_level: logging.Logger) -> None:
    root_level.setLevel(logging.INFO)
    record = _record(message)
    assert quiet_routine_successes(record) is False
    assert record.levelname == "DEBUG"
    root_level.setLevel(logging.DEBUG)
    assert quiet_routine_successes(_record(message)) is True


@pytest.mark.parametrize("message, level", [
    ("Creation is processed: 1 succeeded; 0 failed.", logging.INFO),
    ("Handler 'trainingjob' failed temporarily: Redis is down", logging.ERROR),
    ("Handler 'trainingjob' succeeded.", logging.WARNING),
])
def test_what_a_change_did_and_failures_stay(message: str, level: int, root_level: logging.Logger) -> None:
    root_level.setLevel(logging.INFO)
    record = _record(message, level)
    assert quiet_routine_successes(record) is True
    assert record.levelno == level
