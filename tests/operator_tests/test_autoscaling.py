"""The builtin autoscaler's rule, with time passed in: no broker, no cluster."""

from __future__ import annotations

from kubelm_operator.autoscaling import Decision, QueueFigures, decide, recommend, seed
from kubelm_operator.spec import Autoscaling

SPEC = Autoscaling(min_replicas=0, max_replicas=8, target_queue_length_per_replica=16, activation_queue_length=2,
                   scale_up_stabilization_seconds=0, scale_down_stabilization_seconds=60)


def _run(spec: Autoscaling, current: int, timeline: list[tuple[float, int]]) -> list[Decision]:
    """Feeds (time, backlog) samples one after the other, applying each decision as the operator would."""
    decisions, history = [], ()
    for now, backlog in timeline:
        decision = decide(spec, current, QueueFigures(ready=backlog, unacked=0), now, history)
        decisions.append(decision)
        current, history = decision.desired, decision.history
    return decisions


def test_backlog_over_target_gives_the_ceiling_within_bounds() -> None:
    assert recommend(SPEC, QueueFigures(ready=40, unacked=1))[0] == 3
    assert recommend(SPEC, QueueFigures(ready=1000, unacked=0))[0] == 8
    assert recommend(SPEC, QueueFigures(ready=3, unacked=0))[0] == 1
    reason = recommend(SPEC, QueueFigures(ready=40, unacked=1))[1]
    assert reason == "backlog 41 (ready 40, unacked 1) at 16 per worker wants 3, within [0, 8]: 3"


def test_activation_length_decides_between_zero_and_one() -> None:
    assert recommend(SPEC, QueueFigures(ready=2, unacked=0))[0] == 0
    assert recommend(SPEC, QueueFigures(ready=3, unacked=0))[0] == 1
    # With a floor above zero the activation length does not apply.
    floor = Autoscaling(min_replicas=1, max_replicas=4, activation_queue_length=5)
    assert recommend(floor, QueueFigures(ready=0, unacked=0))[0] == 1


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window() -> None:
    # The last recommendation of 7 was at 10 s: it holds the workers until 70 s.
    decisions = _run(SPEC, 0, [(0, 100), (10, 100), (20, 0), (50, 0), (69, 0), (71, 0)])
    assert [d.desired for d in decisions] == [7, 7, 7, 7, 7, 0]
    assert "held at 7 by the 60 s scale-down window" in decisions[2].reason


def test_a_short_lull_does_not_scale_down() -> None:
    decisions = _run(SPEC, 4, [(0, 64), (30, 0), (45, 64), (100, 64)])
    assert [d.desired for d in decisions] == [4, 4, 4, 4]


def test_scale_up_window_needs_a_burst_to_last() -> None:
    spec = Autoscaling(min_replicas=1, max_replicas=8, target_queue_length_per_replica=10,
                       scale_up_stabilization_seconds=30, scale_down_stabilization_seconds=0)
    decisions = _run(spec, 1, [(0, 10), (5, 80), (20, 80), (36, 80)])
    assert [d.desired for d in decisions] == [1, 1, 1, 8]
    assert "held at 1 by the 30 s scale-up window" in decisions[1].reason


def test_history_keeps_only_what_a_window_can_still_use() -> None:
    decision = _run(SPEC, 0, [(0, 100), (30, 100), (200, 100)])[-1]
    assert [r.at for r in decision.history] == [200]


def test_suspend_goes_to_zero_at_once() -> None:
    decision = decide(SPEC, 5, QueueFigures(ready=500, unacked=3), 0, suspended=True)
    assert (decision.desired, decision.reason) == (0, "spec.suspend is true")
    assert decision.changes(5) and not decision.changes(0)


def test_the_last_write_counts_until_the_watch_shows_it() -> None:
    from kubelm_operator.autoscaling import replicas_now

    assert replicas_now(None, None) == (1, None)  # a Deployment without replicas runs one
    assert replicas_now(3, None) == (3, None)
    assert replicas_now(1, 0) == (0, 0)  # scaled to 0, the watch still shows 1: decide from 0, keep waiting
    assert replicas_now(0, 0) == (0, None)  # the watch caught up: the Deployment is the truth again
    assert replicas_now(2, None) == (2, None)  # someone scaled it by hand afterwards: that counts


def test_a_new_leader_keeps_the_running_workers_for_the_window_and_still_scales_up_at_once() -> None:
    """After a restart or failover the in-memory history is gone: seeded with the replicas running now."""
    idle = decide(SPEC, 5, QueueFigures(ready=0, unacked=0), 100.0, seed(5, 100.0))
    assert idle.desired == 5 and "held at 5 by the 60 s scale-down window" in idle.reason
    later = decide(SPEC, 5, QueueFigures(ready=0, unacked=0), 161.0, idle.history)
    assert later.desired == 0
    busy = decide(SPEC, 1, QueueFigures(ready=100, unacked=0), 100.0, seed(1, 100.0))
    assert busy.desired == 7  # a scale-up window of 0 is not held back by the seed
    # Without the seed, the idle model would have gone to zero at once.
    assert decide(SPEC, 5, QueueFigures(ready=0, unacked=0), 100.0, ()).desired == 0
