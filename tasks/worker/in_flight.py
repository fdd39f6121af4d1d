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
        self._tags: dict[str, str] = {}  # broker delivery tag -> task id (a call delivered twice has two)

    @property
    def count(self) -> int:
        return self._count

    def arrived(self, task_id: str, delivery_tag: str | None) -> None:
        if delivery_tag is not None:
            with self._lock:
                self._tags[delivery_tag] = task_id
        self._add(+1)

    def finished(self, delivery_tag: str | None) -> None:
        if delivery_tag is not None:
            with self._lock:
                if self._tags.pop(delivery_tag, None) is None:
                    return  # counted out already (finished, then revoked)
        self._add(-1)

    def delivery_tags(self) -> list[str]:
        """Tags of the messages held (published so a reaper can requeue them if this worker dies)."""
        with self._lock:
            return list(self._tags)

    def _add(self, delta: int) -> None:
        with self._lock:
            was_saturated = self._count >= self.concurrency
            self._count = max(0, self._count + delta)
            flipped = was_saturated != (self._count >= self.concurrency)
        if flipped:
            self._on_flip()
