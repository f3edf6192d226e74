"""Dynamic batching, free of any transport or model: items in, batches out.

A batch is ready when it holds `max_batch_size` items or when its oldest item
has waited `max_wait` seconds. The worker feeds it deliveries and asks how long
it may block waiting for more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Batcher(Generic[T]):
    max_batch_size: int
    max_wait: float
    """Seconds the oldest waiting item may wait for company."""
    _items: list[T] = field(default_factory=list)
    _oldest: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_wait < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait >= 0")

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        if not self._items:
            self._oldest = now
        self._items.append(item)

    def ready(self, now: float) -> bool:
        if not self._items:
            return False
        assert self._oldest is not None
        return len(self._items) >= self.max_batch_size or now - self._oldest >= self.max_wait

    def time_left(self, now: float) -> float | None:
        """Seconds until the current batch is due; None when empty (wait for the first item)."""
        if not self._items:
            return None
        assert self._oldest is not None
        if len(self._items) >= self.max_batch_size:
            return 0.0
        return max(0.0, self.max_wait - (now - self._oldest))

    def take(self, now: float, limit: int | None = None, budget: int = 0,
             cost: Callable[[T], int] | None = None) -> list[T]:
        """Up to max_batch_size (or `limit`) items, oldest first, and with a `budget` (> 0) only as many as
        fit in it by `cost` — always at least one; leftovers start a new wait from `now`."""
        size = self.max_batch_size if limit is None else max(0, min(limit, self.max_batch_size))
        if budget > 0 and cost is not None and size > 0:
            spent, fits = 0, 0
            for item in self._items[:size]:
                spent += cost(item)
                if fits and spent > budget:
                    break
                fits += 1
            size = fits
        batch, self._items = self._items[:size], self._items[size:]
        self._oldest = now if self._items else None
        return batch

    def remove(self, matches: Callable[[T], bool]) -> list[T]:
        """Takes out the waiting items that match (cancelled before they were batched)."""
        removed = [item for item in self._items if matches(item)]
        if removed:
            self._items = [item for item in self._items if not matches(item)]
            if not self._items:
                self._oldest = None
        return removed
