"""The worker's heartbeat loop: liveness, load, session TTLs, and reaping dead peers.

The loop survives broker outages: a failed beat is logged and retried on the next
tick (redis-py reconnects). A worker that peers reaped while it was cut off (its
record deleted) registers again, so it becomes live and bindable again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import redis as redis_lib

from routing.reaper import reap_dead_workers
from routing.registry import Registry
from routing.sessions import SessionStore

log = logging.getLogger(__name__)

#: Housekeeping (pruning expired sessions, reaping dead peers) runs this often.
housekeeping_interval_s = 2.0


class BeatSource(Protocol):
    """What a heartbeat publishes about its worker."""

    node: str
    incarnation: str

    @property
    def pool_name(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    def held_tags(self) -> list[str]: ...

    def take_touched(self) -> dict[str, float]: ...

    def gauge_values(self) -> dict[str, int]: ...

    def register(self) -> None: ...

    def housekeeping(self) -> None: ...


class Heartbeat(threading.Thread):
    def __init__(self, registry: Registry, sessions: SessionStore, source: BeatSource, interval_s: float) -> None:
        super().__init__(name=f"flagship-heartbeat-{source.node}", daemon=True)
        self.registry = registry
        self.sessions = sessions
        self.source = source
        self.interval_s = interval_s
        self._stopping = threading.Event()
        self._nudge = threading.Event()
        self._next_housekeeping = 0.0

    def nudge(self) -> None:
        """Publish soon: something producers route on changed."""
        self._nudge.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._nudge.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._nudge.clear()  # before beating: a nudge during the beat triggers the next one
            try:
                self.beat()
            except redis_lib.RedisError as exc:
                log.warning("heartbeat of %s failed (%s); retrying", self.source.node, exc)
            self._nudge.wait(self.interval_s)

    def beat(self) -> None:
        source = self.source
        touched = source.take_touched()
        pipe = self.registry.redis.pipeline(transaction=False)
        self.registry.beat(source.node, source.incarnation, source.in_flight, source.held_tags(), pipe,
                           extra=source.gauge_values())
        if touched:
            self.sessions.touch(touched, pipeline=pipe)
        still_registered = pipe.execute()[1]
        if not still_registered:
            log.warning("worker %s was reaped while cut off from the broker; registering again", source.node)
            source.register()
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + housekeeping_interval_s
            self.sessions.prune_worker(source.node)
            reap_dead_workers(self.registry.redis, source.pool_name)
            source.housekeeping()
