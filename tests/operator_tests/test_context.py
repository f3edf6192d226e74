"""What handlers share: when a timer's tick is worth a reconciliation."""

from __future__ import annotations

import kopf

from kubelm_operator.config import from_environ
from kubelm_operator.context import Context


def test_a_tick_is_due_unless_another_trigger_reconciled_within_half_an_interval() -> None:
    now = [100.0]
    ctx = Context.create(from_environ({}))
    ctx.clock = lambda: now[0]
    assert ctx.tick_due("uid-1", 10)  # never reconciled
    ctx.reconciled["uid-1"] = 100.0
    now[0] = 104.9
    assert not ctx.tick_due("uid-1", 10)
    now[0] = 105.0
    assert ctx.tick_due("uid-1", 10)
    assert ctx.tick_due("uid-2", 10)  # another object
    ctx.forget("ns/a", "uid-1")
    now[0] = 100.0
    assert ctx.tick_due("uid-1", 10)


def test_a_deleted_object_leaves_nothing_behind() -> None:
    ctx = Context.create(from_environ({}))
    ctx.reconciled["uid-1"] = 1.0
    body = kopf.Body({"apiVersion": "kubelm.io/v1alpha1", "metadata": {"uid": "uid-1"}, "spec": {}})
    ctx.handled.store(body=body, patch=kopf.Patch(), essence=ctx.handled.build(body=body))
    assert len(ctx.handled) == 1
    ctx.gone("uid-1")
    assert "uid-1" not in ctx.reconciled and len(ctx.handled) == 0


def _body(version: str, status: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"uid": "uid-1", "resourceVersion": version}, "status": status}


def test_the_status_base_is_the_last_write_only_while_the_watch_lags_behind_it() -> None:
    ctx = Context.create(from_environ({}))
    assert ctx.status_base(_body("10", {"phase": "Pending"})) == {"phase": "Pending"}
    ctx.wrote_status(_body("10", {"phase": "Pending"}), {"phase": "Running"}, "11")
    # Two reconciliations of the same lagging version build on each other's writes.
    assert ctx.status_base(_body("10", {"phase": "Pending"})) == {"phase": "Running"}
    ctx.wrote_status(_body("10", {"phase": "Pending"}), {"phase": "Running", "n": 2}, "12")
    assert ctx.status_base(_body("11", {"phase": "Running"})) == {"phase": "Running", "n": 2}  # the first write
    assert ctx.status_base(_body("12", {"phase": "Running", "n": 2})) == {"phase": "Running", "n": 2}
    # A version this process did not make comes after its writes (another writer, or a pause while another
    # replica acted): it is the base, not the remembered status.
    assert ctx.status_base(_body("20", {"phase": "Succeeded"})) == {"phase": "Succeeded"}
