"""State of one worker node, handed explicitly to every operation (like arq's ``ctx``)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from routing import names
from routing.errors import SessionNotFound
from routing.heartbeat import Heartbeat
from routing.pools import Pool
from routing.reaper import reap_lock, reap_lock_ttl_s, reap_node
from routing.registry import Registry, WorkerInfo
from routing.sessions import SessionStore
from routing.settings import Settings
from routing.turns import SessionTurns

#: A session seen to exist is not looked up again for this long.
session_cache_ttl_s = 5.0


@dataclass
class WorkerState:
    """One worker node: its registration, heartbeat, session bookkeeping and services.

    Implements :class:`routing.heartbeat.BeatSource`.
    """

    node: str
    pool: Pool
    settings: Settings
    redis: Redis
    concurrency: int
    capabilities: tuple[str, ...] = ()
    turns: SessionTurns = field(default_factory=SessionTurns)
    #: Objects operations keep per worker (ref store, sandbox pool, ...), by name.
    services: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: Counters published with every heartbeat (e.g. ``refs``), by name.
    gauges: dict[str, Callable[[], int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.registry = Registry(self.redis, self.settings)
        self.sessions = SessionStore(self.redis)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._touched: dict[str, float] = {}
        self._known_sessions: dict[str, float] = {}
        self._seqs: dict[str, int] = {}
        self._ttls: dict[str, float] = {}
        self._held: dict[str, str] = {}  # task id -> broker delivery tag
        #: Differs between runs of a node under the same name; strict calls check it.
        self.incarnation = f"{os.getpid()}-{int(self.started * 1000)}"
        self.heartbeat = Heartbeat(self.registry, self.sessions, self, self.settings.heartbeat_interval_s)

    @property
    def queue(self) -> str:
        return names.worker_queue(self.node)

    @property
    def pool_name(self) -> str:
        return self.pool.name

    def start(self) -> None:
        """Requeue what a previous run under this name left behind, then register and heartbeat."""
        with reap_lock(self.redis, self.node, wait_s=reap_lock_ttl_s):
            reap_node(self.redis, self.node, self.pool.name)
            self.redis.delete(names.worker_sessions_key(self.node))
            self.register()
        self.heartbeat.start()

    def register(self) -> None:
        self.registry.register(WorkerInfo(
            node=self.node, pool=self.pool.name, host=socket.gethostname(), pid=os.getpid(),
            queue=self.queue, capabilities=self.capabilities, concurrency=self.concurrency,
            started=self.started, incarnation=self.incarnation,
        ))

    def drain(self) -> None:
        """Warm shutdown began: producers stop sending here; the heartbeat goes on until ``stop``."""
        self.registry.drain(self.node)
        self.heartbeat.nudge()

    def stop(self) -> None:
        """Calls finished (or went back to the queue): stop heartbeating, deregister, free services."""
        self.heartbeat.stop()
        self.registry.deregister(self.node, self.pool.name)
        for service in self.services.values():
            shutdown = getattr(service, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- in-flight accounting (called from Celery signals) --------------------

    def call_arrived(self, task_id: str, delivery_tag: str | None) -> None:
        if delivery_tag is not None:
            with self._lock:
                self._held[task_id] = delivery_tag
        self._count_in_flight(+1)

    def call_finished(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)
        self._count_in_flight(-1)

    def held_tags(self) -> list[str]:
        """Delivery tags of the messages this worker holds (published so a reaper can requeue them)."""
        with self._lock:
            return list(self._held.values())

    def gauge_values(self) -> dict[str, int]:
        return {name: gauge() for name, gauge in self.gauges.items()}

    def _count_in_flight(self, delta: int) -> None:
        """Producers route on "saturated or not": publish at once only when that flips."""
        with self._lock:
            was_saturated = self._in_flight >= self.concurrency
            self._in_flight = max(0, self._in_flight + delta)
            flipped = was_saturated != (self._in_flight >= self.concurrency)
        if flipped:
            self.heartbeat.nudge()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- sessions -------------------------------------------------------------

    def ensure_session(self, session_id: str, ttl_s: float) -> None:
        """Refuse calls of sessions that were closed or expired; renew the TTL of live ones."""
        now = time.monotonic()
        if self._known_sessions.get(session_id, 0.0) < now:
            if not self.sessions.exists(session_id):
                self._known_sessions.pop(session_id, None)
                raise SessionNotFound(session_id)
            self._known_sessions[session_id] = now + session_cache_ttl_s
        with self._lock:
            self._touched[session_id] = ttl_s
            self._ttls[session_id] = ttl_s

    def session_ttl(self, session_id: str) -> float:
        return self._ttls.get(session_id, self.settings.session_ttl_s)

    def forget_session(self, session_id: str) -> int:
        """Free everything this worker holds for a session; returns how many objects went."""
        self._known_sessions.pop(session_id, None)
        self._seqs.pop(session_id, None)
        self._ttls.pop(session_id, None)
        freed = 0
        for service in self.services.values():
            release = getattr(service, "release_session", None)
            if release is not None:
                freed += int(release(session_id) or 0)
        return freed

    def housekeeping(self) -> None:
        self.sweep_sessions()

    def sweep_sessions(self) -> None:
        """Free the objects and bookkeeping of sessions whose records expired or were closed."""
        held: set[str] = set(self._ttls)
        for service in self.services.values():
            sessions = getattr(service, "sessions", None)
            if sessions is not None:
                held |= set(sessions())
        ordered = sorted(held)
        for session_id, alive in zip(ordered, self.sessions.alive(ordered)):
            if not alive:
                self.forget_session(session_id)

    def next_seq(self, session_id: str) -> int:
        """1, 2, 3, ... per session on this worker (calls of a session never run at once)."""
        with self._lock:
            self._seqs[session_id] = seq = self._seqs.get(session_id, 0) + 1
        return seq

    def take_touched(self) -> dict[str, float]:
        with self._lock:
            touched, self._touched = self._touched, {}
        return touched
