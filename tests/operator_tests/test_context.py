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
