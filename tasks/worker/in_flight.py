"""Which calls a worker holds right now (fed by Celery's task signals)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class InFlight:
    """Counts held calls and remembers their broker delivery tags.

    ``on_flip`` runs when the worker turns saturated or stops being so: producers
    route on that bit, so it is published at once rather than on the next beat.
    """

    def __init__(self, concurrency: int, on_flip: Callable[[], None]) -> None:
        self.concurrency = concurrency
        self._on_flip = on_flip
        self._lock = threading.Lock()
        self._count = 0
        self._tags: dict[str, str] = {}  # task id -> broker delivery tag

    @property
    def count(self) -> int:
        return self._count

    def arrived(self, task_id: str, delivery_tag: str | None) -> None:
        if delivery_tag is not None:
            with self._lock:
                self._tags[task_id] = delivery_tag
        self._add(+1)

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._tags.pop(task_id, None)
        self._add(-1)

    def delivery_tags(self) -> list[str]:
        """Tags of the messages held (published so a reaper can requeue them if this worker dies)."""
        with self._lock:
            return list(self._tags.values())

    def _add(self, delta: int) -> None:
        with self._lock:
            was_saturated = self._count >= self.concurrency
            self._count = max(0, self._count + delta)
            flipped = was_saturated != (self._count >= self.concurrency)
        if flipped:
            self._on_flip()
