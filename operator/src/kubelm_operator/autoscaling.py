"""The builtin autoscaler's decision: queue figures and time in, desired workers and the reason out.

Pure, with the clock passed in, so its rule is tested without a broker or a cluster:

- backlog = ready + unacknowledged messages; wanted = ceil(backlog / targetQueueLengthPerReplica),
  within [minReplicas, maxReplicas];
- from zero, workers start only when the backlog exceeds activationQueueLength; a backlog at or
  under it lets the workers go to zero (when minReplicas is 0);
- stabilization as the HorizontalPodAutoscaler does it: scaling up follows the lowest
  recommendation of the last scaleUpStabilizationSeconds, scaling down the highest of the last
  scaleDownStabilizationSeconds, so one short burst or lull does not move the Deployment;
- suspend: zero, at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spec import Autoscaling


@dataclass(frozen=True)
class QueueFigures:
    ready: int
    unacked: int
    consumers: int = 0

    @property
    def backlog(self) -> int:
        return self.ready + self.unacked


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    history: tuple[Recommendation, ...]
    """Recommendations still inside a stabilization window, to pass to the next decision."""

    def changes(self, current: int) -> bool:
        return self.desired != current


def recommend(spec: Autoscaling, figures: QueueFigures) -> tuple[int, str]:
    """What the queue alone asks for, before stabilization."""
    backlog = figures.backlog
    if backlog <= spec.activation_queue_length and spec.min_replicas == 0:
        return 0, f"backlog {backlog} is at or under the activation length {spec.activation_queue_length}"
    wanted = math.ceil(backlog / spec.target_queue_length_per_replica)
    bounded = min(spec.max_replicas, max(spec.min_replicas, wanted, 1 if backlog else 0))
    return bounded, (f"backlog {backlog} (ready {figures.ready}, unacked {figures.unacked}) at "
                     f"{spec.target_queue_length_per_replica} per worker wants {wanted}, "
                     f"within [{spec.min_replicas}, {spec.max_replicas}]: {bounded}")


def decide(spec: Autoscaling, current: int, figures: QueueFigures, now: float,
           history: tuple[Recommendation, ...] = (), suspended: bool = False) -> Decision:
    if suspended:
        return Decision(0, "spec.suspend is true", ())
    recommended, why = recommend(spec, figures)
    keep = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
    window = (*(r for r in history if now - r.at <= keep), Recommendation(now, recommended))

    def within(seconds: int) -> list[int]:
        return [r.replicas for r in window if now - r.at <= seconds]

    desired = current
    if recommended > current:
        desired = max(current, min(within(spec.scale_up_stabilization_seconds)))
        if desired < recommended:
            why += f"; held at {desired} by the {spec.scale_up_stabilization_seconds} s scale-up window"
    elif recommended < current:
        desired = min(current, max(within(spec.scale_down_stabilization_seconds)))
        if desired > recommended:
            why += f"; held at {desired} by the {spec.scale_down_stabilization_seconds} s scale-down window"
    return Decision(desired, why, window)


def seed(current: int, now: float) -> tuple[Recommendation, ...]:
    """The history a process starts with (after a restart or a failover): the replicas running now, as if
    just recommended, so that a new leader does not scale down at once what the last one kept up for its
    window. Placed an instant before `now`, so that a scale-up window of 0 is not held back by it."""
    return (Recommendation(now - 1e-3, current),)


def replicas_now(observed: int | None, written: int | None) -> tuple[int, int | None]:
    """The replicas to decide from, and what to keep remembering of the autoscaler's last write.

    The Deployment watch can lag behind the autoscaler's own write (its next event waits behind a
    reconciliation), and deciding from the older figure would make, record and announce the same change on
    every tick until it catches up. So the last write counts until the watch shows it; after that the
    Deployment is the truth again, whoever changes it next. A Deployment without replicas runs one.
    """
    current = observed if observed is not None else 1
    if written is None or written == current:
        return current, None
    return written, written
