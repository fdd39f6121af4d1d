"""One worker node's runtime, handed explicitly to every operation (like arq's ``ctx``)."""

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
from routing.broker.drain import HELD
from routing.fleet.heartbeat import Heartbeat
from routing.fleet.pulse import Pulse
from routing.fleet.reaper import reap_lock, reap_lock_ttl_s, reap_node
from routing.fleet.registry import Registry, WorkerInfo
from routing.fleet.sessions import SessionStore
from routing.pools import Pool
from tasks.worker.in_flight import InFlight
from tasks.worker.session_book import SessionBook
from tasks.worker.settings import WorkerSettings
from tasks.worker.turns import SessionTurns


def _new_incarnation(started: float) -> str:
    """Tells one run of this node from the next (strict calls carry it)."""
    return f"{os.getpid()}-{int(started * 1000)}"


@dataclass
class WorkerState:
    """One worker node: its lifecycle (register, heartbeat, drain, stop) and the parts operations use.

    The parts: ``turns`` (one call of a session at a time), ``calls`` (in-flight
    accounting), ``book`` (sessions served here) and ``services`` (ref store,
    sandbox pool). Implements :class:`routing.fleet.heartbeat.BeatSource`.
    """

    node: str
    pool: Pool
    settings: WorkerSettings
    redis: Redis
    concurrency: int
    capabilities: tuple[str, ...] = ()
    #: Program modules imported at start (``FLAGSHIP_PROGRAMS`` and the pool's ``programs``).
    programs: tuple[str, ...] = ()
    turns: SessionTurns = field(default_factory=SessionTurns)
    #: Objects operations keep per worker (ref store, sandbox pool, ...), by name.
    services: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: Counters published with every heartbeat (e.g. ``refs``), by name.
    gauges: dict[str, Callable[[], int]] = field(default_factory=dict)
    #: The broker's URL, for the liveness pulse (None: no pulse, the heartbeat thread alone keeps liveness).
    redis_url: str | None = None

    def __post_init__(self) -> None:
        self.registry = Registry(self.redis, self.settings.routing)
        self.sessions = SessionStore(self.redis)
        self.book = SessionBook(self.sessions, self.settings.routing.session_ttl_s)
        #: Differs between runs of a node under the same name; strict calls check it.
        self.incarnation = _new_incarnation(self.started)
        routing = self.settings.routing
        self.pulse = None if self.redis_url is None else Pulse(
            self.redis_url, names.heartbeat_key(self.node), self.incarnation, ttl_s=routing.heartbeat_ttl_s,
            interval_s=routing.heartbeat_interval_s, stall_s=self.settings.stall_s)
        self.heartbeat = Heartbeat(self.registry, self.sessions, self, routing.heartbeat_interval_s,
                                   on_tick=None if self.pulse is None else self.pulse.feed)
        self.calls = InFlight(self.concurrency, self.heartbeat.nudge)
        self._run_lock = threading.RLock()  # one reincarnation at a time (the heartbeat's, or a call's)
        HELD.key, HELD.parked = names.worker_key(self.node), self.turns.waiting  # the drain script's count

    @property
    def queue(self) -> str:
        return names.worker_queue(self.node)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Requeue what a previous run under this name left behind, then register, pulse and heartbeat."""
        with reap_lock(self.redis, self.node, wait_s=reap_lock_ttl_s):
            reap_node(self.redis, self.node, self.pool.name)
            self.redis.delete(names.worker_sessions_key(self.node))
            self.register()
        if self.pulse is not None:
            self.pulse.start()
        self.heartbeat.start()

    def register(self) -> None:
        self._register()
        self.redis.hset(names.worker_key(self.node), "drains", HELD.drains_done)  # set_held.lua compares

    def _register(self) -> None:
        self.registry.register(WorkerInfo(
            node=self.node, pool=self.pool.name, host=socket.gethostname(), pid=os.getpid(),
            queue=self.queue, capabilities=self.capabilities, programs=self.programs, concurrency=self.concurrency,
            started=self.started, incarnation=self.incarnation,
        ))

    def confirm_run(self) -> None:
        """Before a strict call's result is stored: if the heartbeat was silent past the TTL (this process was
        stopped, or cut off), check the fleet did not declare this run dead meanwhile; if it did, become a new
        run first (the call then fails as its caller was told). Costs nothing while the heartbeat beats."""
        if time.monotonic() - self.heartbeat.last_beat >= self.settings.routing.heartbeat_ttl_s:
            self.reincarnate()  # a no-op while the registry still names this run

    def reincarnate(self) -> None:
        """Declared dead by the fleet (stalled, or cut off past the heartbeat TTL), yet running: come back as a
        new run. Strict calls sent to the old run fail with ``SessionWorkerUnavailable`` here (the incarnation
        check), its sessions' objects go, and the calls it held (requeued by the reaper) are answered from
        the store or counted as reruns when their turn comes."""
        with self._run_lock:
            if self.redis.hget(names.worker_key(self.node), "incarnation") == self.incarnation:
                return  # registered as this run: a call became the new run a moment ago
            self._become_new_run()

    def _become_new_run(self) -> None:
        self.incarnation = _new_incarnation(time.time())
        self.turns.mark_all_copies()
        for session_id in self.book.sessions() | self._service_sessions():
            self.forget_session(session_id)
        if self.pulse is not None:
            self.pulse.renew_as(self.incarnation)
        self.register()

    def drain(self) -> None:
        """Warm shutdown began: producers stop sending here; the heartbeat goes on until ``stop``."""
        self.registry.drain(self.node)
        self.heartbeat.nudge()

    def stop(self) -> None:
        """Calls finished (or went back to the queue): stop heartbeating, deregister, free services.

        The pulse stops after deregistering: it only ever renews a key that names
        this run, so it cannot bring the deleted heartbeat back.
        """
        self.heartbeat.stop()
        try:
            self.registry.deregister(self.node, self.pool.name)
        finally:
            if self.pulse is not None:
                self.pulse.stop()
        for service in self.services.values():
            shutdown = getattr(service, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- sessions -------------------------------------------------------------

    def forget_session(self, session_id: str) -> int:
        """Free everything this worker holds for a session; returns how many objects went."""
        self.book.forget(session_id)
        freed = 0
        for service in self.services.values():
            release = getattr(service, "release_session", None)
            if release is not None:
                freed += int(release(session_id) or 0)
        return freed

    def sweep_sessions(self) -> None:
        """Free the objects and bookkeeping of sessions whose records expired or were closed."""
        ordered = sorted(self.book.sessions() | self._service_sessions())
        for session_id, alive in zip(ordered, self.sessions.alive(ordered)):
            if not alive:
                self.forget_session(session_id)

    def _service_sessions(self) -> set[str]:
        held: set[str] = set()
        for service in self.services.values():
            sessions = getattr(service, "sessions", None)
            if sessions is not None:
                held |= set(sessions())
        return held

    # -- what the heartbeat publishes (BeatSource) -----------------------------

    @property
    def pool_name(self) -> str:
        return self.pool.name

    @property
    def in_flight(self) -> int:
        return self.calls.count

    def held_tags(self) -> list[str]:
        return self.calls.delivery_tags()

    def held_count(self) -> tuple[int, int]:
        """Calls received and not started (parked), with the drains completed before counting them."""
        drains = HELD.drains_done  # first: a drain finishing meanwhile makes the script keep its newer count
        return self.turns.waiting(), drains

    def take_touched(self) -> dict[str, float]:
        return self.book.take_touched()

    def gauge_values(self) -> dict[str, int]:
        return {name: gauge() for name, gauge in self.gauges.items()}

    def housekeeping(self) -> None:
        self.sweep_sessions()
