"""The operator's process set-up: which of kopf's log lines are routine; the finalizer the admission
policy adds is the one the operator removes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import yaml

from kubelm_operator.main import FINALIZER, quiet_routine_successes
from support import REPO


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


def test_the_admission_policy_adds_the_operators_finalizer_to_both_kinds() -> None:
    policy, binding = yaml.safe_load_all((REPO / "manifests/admission/finalizer-policy.yaml").read_text())
    assert f'finalizers: ["{FINALIZER}"]' in policy["spec"]["mutations"][0]["applyConfiguration"]["expression"]
    rule, = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["operations"]) == (["kubelm.io"], ["CREATE"])
    crds = [yaml.safe_load(path.read_text()) for path in (REPO / "crds").glob("*.kubelm.io.yaml")]
    plurals = {crd["spec"]["names"]["plural"] for crd in crds}
    assert set(rule["resources"]) == plurals
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
