"""Prometheus metrics of the operator (served on KUBELM_METRICS_PORT)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("kubelm_operator_reconciles_total", "Reconciliations by kind and result",
                     ["kind", "trigger", "result"])
DURATION = Histogram("kubelm_operator_reconcile_seconds", "Time one reconciliation took", ["kind"],
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("kubelm_operator_errors_total", "Reconciliation errors by kind and reason", ["kind", "reason"])
STATUS_WRITES = Counter("kubelm_operator_status_writes_total", "Status writes (only when something changed)",
                        ["kind"])

QUEUE_PUBLISH_RATE = Gauge("kubelm_operator_queue_publish_rate", "Messages per second published to a model's "
                           "request queue (RabbitMQ's management API)", ["namespace", "languagemodel"])
QUEUE_DELIVER_RATE = Gauge("kubelm_operator_queue_deliver_rate", "Messages per second delivered from a model's "
                           "request queue (RabbitMQ's management API)", ["namespace", "languagemodel"])


def forget_model(namespace: str, name: str) -> None:
    """A deleted model's series go with it."""
    for gauge in (QUEUE_PUBLISH_RATE, QUEUE_DELIVER_RATE):
        with suppress(KeyError):
            gauge.remove(namespace, name)


@contextmanager
def reconciling(kind: str, trigger: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except BaseException as e:
        RECONCILES.labels(kind, trigger, "error").inc()
        ERRORS.labels(kind, type(e).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind, trigger, "ok").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - started)
