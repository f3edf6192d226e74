"""What handlers share: when a timer's tick is worth a reconciliation."""

from __future__ import annotations

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
