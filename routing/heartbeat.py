"""The worker's heartbeat loop: liveness, in-flight count, session TTLs and reaping peers.

The loop survives broker outages: a failed beat is logged and retried on the next
tick (redis-py reconnects), so a worker that outlives an outage becomes live again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis as redis_lib

from routing.reaper import reap_dead_workers
from routing.registry import Registry
from routing.sessions import SessionStore

log = logging.getLogger(__name__)

#: Housekeeping (pruning expired sessions, reaping dead peers) runs this often.
housekeeping_interval_s = 2.0


class Heartbeat(threading.Thread):
    def __init__(
        self,
        registry: Registry,
        sessions: SessionStore,
        node: str,
        pool: str,
        interval_s: float,
        in_flight: Callable[[], int],
        take_touched: Callable[[], dict[str, float]],
        extra_fields: Callable[[], dict[str, int]] = dict,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"flagship-heartbeat-{node}", daemon=True)
        self.registry = registry
        self.sessions = sessions
        self.node = node
        self.pool = pool
        self.interval_s = interval_s
        self.in_flight = in_flight
        self.take_touched = take_touched
        self.extra_fields = extra_fields
        self.housekeeping = housekeeping
        self._stopping = threading.Event()
        self._nudge = threading.Event()
        self._next_housekeeping = 0.0

    def nudge(self) -> None:
        """Publish soon: the in-flight count changed."""
        self._nudge.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._nudge.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.beat()
            except redis_lib.RedisError as exc:
                log.warning("heartbeat of %s failed (%s); retrying", self.node, exc)
            self._nudge.wait(self.interval_s)
            self._nudge.clear()

    def beat(self) -> None:
        touched = self.take_touched()
        pipe = self.registry.redis.pipeline(transaction=False)
        self.registry.beat(self.node, self.in_flight(), pipeline=pipe, extra=self.extra_fields())
        if touched:
            self.sessions.touch(touched, pipeline=pipe)
        pipe.execute()
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + housekeeping_interval_s
            self.registry.prune_sessions(self.node)
            reap_dead_workers(self.registry.redis, self.pool)
            if self.housekeeping is not None:
                self.housekeeping()
