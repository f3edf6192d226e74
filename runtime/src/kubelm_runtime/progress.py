"""Training progress pushed to Redis for the operator to mirror into TrainingJob status.

Redis is optional here: when it is down the trainer logs a warning, keeps
training, and tries again later, so an unreachable cache never costs GPU hours.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kubelm_contract import keys

from .redis_store import RedisStore, StoreUnavailable

log = logging.getLogger(__name__)
PROGRESS_TTL_SECONDS = 7 * 24 * 3600


class ProgressReporter:
    def __init__(self, redis_url: str | None, job_id: str, min_interval: float = 5.0, retry_after: float = 30.0):
        # A short timeout: a stalled Redis may cost the loop half a second, once per retry window.
        self.store = RedisStore(redis_url, timeout=0.5) if redis_url else None
        self.key = keys.progress(job_id)
        self.min_interval = min_interval
        self.retry_after = retry_after
        self._last_sent = float("-inf")
        self._down_since: float | None = None
        self.latest: dict[str, Any] = {}

    def report(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Sends `progress` if due; returns whether it reached Redis."""
        self.latest = progress
        now = time.monotonic()
        if self.store is None or (not force and now - self._last_sent < self.min_interval):
            return False
        if self._down_since is not None and now - self._down_since < self.retry_after and not force:
            return False
        try:
            self.store.set_json(self.key, {**progress, "updated": time.time()}, PROGRESS_TTL_SECONDS)
        except StoreUnavailable as e:
            if self._down_since is None:
                log.warning("progress not sent, training continues: %s", e)
            self._down_since = now
            return False
        if self._down_since is not None:
            log.info("progress reporting recovered")
            self._down_since = None
        self._last_sent = now
        return True
