"""The worker's heartbeat loop: load, session TTLs, reaping dead peers, and feeding the pulse.

Liveness itself is kept by :mod:`routing.fleet.pulse`, a child process the GIL cannot
starve; this thread still renews the heartbeat key with every beat, publishes
load and gauges, touches sessions and does housekeeping, and feeds the pulse a
byte per beat (a pulse not fed for its stall limit stops renewing: a hung worker
stops being live). Under CPU load it may lag; only liveness must not.

The loop survives anything: a failed beat or housekeeping round is logged once
per distinct error (and once when it recovers) and retried on the next tick
(redis-py reconnects; with Sentinel, to the current primary). A worker that
peers reaped while it was stalled or cut off (its record deleted) was declared
dead: its callers were failed and its calls requeued. It comes back as a new
incarnation (``BeatSource.reincarnate``), never as the run its sessions knew.

After an outage (a Sentinel failover too) every worker's heartbeat key may have
expired while nobody could renew it. So a worker that was cut off reaps no peer
for one heartbeat TTL after it beats again: the peers are renewing their keys
too, and only one still silent after that is dead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis as redis_lib

from routing.fleet.reaper import reap_dead_workers
from routing.fleet.registry import Registry
from routing.fleet.sessions import SessionStore

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

    def held_count(self) -> tuple[int, int] | None: ...

    def take_touched(self) -> dict[str, float]: ...

    def gauge_values(self) -> dict[str, int]: ...

    def register(self) -> None: ...

    def reincarnate(self) -> None: ...

    def housekeeping(self) -> None: ...


class Heartbeat(threading.Thread):
    def __init__(self, registry: Registry, sessions: SessionStore, source: BeatSource, interval_s: float,
                 on_tick: Callable[[], None] | None = None) -> None:
        super().__init__(name=f"flagship-heartbeat-{source.node}", daemon=True)
        self.registry = registry
        self.sessions = sessions
        self.source = source
        self.interval_s = interval_s
        #: Called at every tick, before beating (feeds the liveness pulse).
        self.on_tick = on_tick
        self._stopping = threading.Event()
        self._nudge = threading.Event()
        self._next_housekeeping = 0.0
        #: The error each step last failed with (None: it last succeeded), so each is logged once.
        self._failing: dict[str, str | None] = {}
        #: Failed steps since start (beats, housekeeping rounds, ticks).
        self.errors = 0
        #: Reaping peers waits until then (monotonic): one TTL after this worker beat again after an outage.
        self.reap_after = 0.0
        self._cut_off = False
        #: When a beat last went through (monotonic): silent past the TTL, this run may have been declared dead.
        self.last_beat = time.monotonic()

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
            if self.on_tick is not None:
                self._guarded("tick", self.on_tick)
            if self._guarded("beat", self.beat):
                if self._cut_off:  # back after an outage: the peers' keys may have lapsed meanwhile
                    self._cut_off = False
                    self.reap_after = time.monotonic() + self.registry.settings.heartbeat_ttl_s
            else:
                self._cut_off = True
            if time.monotonic() >= self._next_housekeeping:
                self._next_housekeeping = time.monotonic() + housekeeping_interval_s
                self._guarded("housekeeping", self.housekeeping)
            self._nudge.wait(self.interval_s)

    def _guarded(self, step: str, fn: Callable[[], None]) -> bool:
        """Run one step (True if it worked); never let an exception end the loop, nor log a failure twice in a row."""
        try:
            fn()
        except Exception as exc:
            self.errors += 1
            signature = f"{type(exc).__name__}: {exc}"
            if self._failing.get(step) != signature:
                self._failing[step] = signature
                redis_error = isinstance(exc, redis_lib.RedisError)
                log.warning("heartbeat %s of %s failed (%s); retrying", step, self.source.node, signature,
                            exc_info=not redis_error)
            return False
        if self._failing.get(step) is not None:
            log.warning("heartbeat %s of %s works again", step, self.source.node)
        self._failing[step] = None
        return True

    def beat(self) -> None:
        source = self.source
        touched = source.take_touched()
        pipe = self.registry.redis.pipeline(transaction=False)
        self.registry.beat(source.node, source.incarnation, source.in_flight, source.held_tags(), pipe,
                           extra=source.gauge_values(), held=source.held_count())
        if touched:
            self.sessions.touch(touched, pipeline=pipe)
        still_registered = pipe.execute()[1]
        self.last_beat = time.monotonic()
        if not still_registered:
            log.warning("worker %s was declared dead while stalled or cut off from the broker; registering again "
                        "as a new incarnation (its sessions' state is gone)", source.node)
            source.reincarnate()

    def housekeeping(self) -> None:
        """Prune this worker's expired sessions, reap dead peers, then the worker's own sweep."""
        self.sessions.prune_worker(self.source.node)
        if time.monotonic() >= self.reap_after:
            reap_dead_workers(self.registry.redis, self.source.pool_name)
        self.source.housekeeping()
