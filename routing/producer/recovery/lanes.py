"""Background work off the result listener's thread, one lane per session: a session's work runs in order.

A strict session whose worker died reruns its pending calls on the rebuilt
session (``CallFuture`` with ``rehydrate``). The listener fails those calls in the
order they were sent; each rerun rebuilds (once) and sends again. On a plain
thread pool the reruns raced, and a session's calls could run on the new worker
in any order. Here a session's work runs one item at a time, in the order it was
given, while different sessions' work runs side by side on ``threads`` threads.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

#: Threads shared by every session's lane.
default_threads = 4


class Lanes:
    def __init__(self, threads: int = default_threads, name: str = "flagship-rehydrate") -> None:
        self.threads = threads
        self.name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._lanes: dict[str, deque[Callable[[], None]]] = {}

    def run(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the work given before under ``key`` (at once if there is none)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            lane = self._lanes.setdefault(key, deque())
            lane.append(fn)
            if len(lane) > 1:
                return  # the thread running the lane takes it next
            executor = self._executor
        executor.submit(self._drain, key)

    def pending(self) -> int:
        """Work items given and not finished."""
        with self._lock:
            return sum(len(lane) for lane in self._lanes.values())

    def _drain(self, key: str) -> None:
        while True:
            with self._lock:
                lane = self._lanes.get(key)
                if not lane:  # shut down meanwhile
                    return
                fn = lane[0]
            try:
                fn()
            except Exception:  # each item settles its own call; the next ones still run
                log.exception("background work for %s failed", key)
            with self._lock:
                lane = self._lanes.get(key)
                if lane is None:
                    return
                lane.popleft()
                if not lane:
                    del self._lanes[key]
                    return

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            self._lanes.clear()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
