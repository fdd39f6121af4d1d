"""Per-session turns on a worker: one call of a session at a time, in arrival order.

A worker with several threads may hold several calls of the same session at once.
Each call takes a ticket when the worker *receives* it (in queue order, on the
consumer thread) and waits for its turn before running; calls of other sessions
are not held up.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class SessionTurns:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queues: dict[str, deque[str]] = {}

    def arrive(self, session_id: str, call_id: str) -> None:
        with self._lock:
            self._queues.setdefault(session_id, deque()).append(call_id)

    def leave(self, session_id: str, call_id: str) -> None:
        """Drop a ticket (the call finished, or will never run here)."""
        with self._lock:
            queue = self._queues.get(session_id)
            if queue is None:
                return
            try:
                queue.remove(call_id)
            except ValueError:
                return
            if not queue:
                del self._queues[session_id]
            self._lock.notify_all()

    @contextmanager
    def turn(self, session_id: str, call_id: str) -> Iterator[None]:
        with self._lock:
            queue = self._queues.get(session_id)
            if queue is None or call_id not in queue:
                # Not seen on arrival (e.g. a redelivery): queue it now.
                queue = self._queues.setdefault(session_id, deque())
                queue.append(call_id)
            while queue[0] != call_id:
                self._lock.wait()
        try:
            yield
        finally:
            self.leave(session_id, call_id)

    def waiting(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())
