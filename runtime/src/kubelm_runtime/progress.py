"""Training progress pushed to Redis for the operator to mirror into TrainingJob status.

Redis is optional here: when it is down the trainer logs a warning, keeps
training, and tries again later, so an unreachable cache never costs GPU hours.
"""

from __future__ import annotations

import time
from typing import Any

from kubelm_contract import keys

from .redis_store import OptionalRedis, RedisStore

PROGRESS_TTL_SECONDS = 7 * 24 * 3600


class ProgressReporter:
    def __init__(self, redis_url: str | None, job_id: str, min_interval: float = 5.0, retry_after: float = 30.0,
                 incarnation: str | None = None):
        # A short timeout: a stalled Redis may cost the loop half a second, once per retry window.
        self.redis = OptionalRedis(redis_url, "progress reporting (training continues)", 0.5, retry_after)
        self.key = keys.progress(job_id)
        self.min_interval = min_interval
        # The key outlives its writer (a TTL of days): the stamp lets the operator tell this run's report
        # from one a deleted job of the same name left behind.
        self.stamp = {"incarnation": incarnation} if incarnation is not None else {}
        self._last_sent = float("-inf")
        self.latest: dict[str, Any] = {}

    def report(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Sends `progress` if due; returns whether it reached Redis."""
        self.latest = progress
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval:
            return False
        document = {**progress, "updated": time.time(), **self.stamp}

        def send(store: RedisStore) -> bool:
            store.set_json(self.key, document, PROGRESS_TTL_SECONDS)
            return True

        sent = self.redis.call(send, False, force=force)
        if sent:
            self._last_sent = now
        return sent
