"""A producer's cached view of the workers it routes to, refreshed off the call path.

Calls read this view instead of asking Redis, so routing adds no round trip; a
worker whose heartbeat expires turns dead here within one refresh interval, and
the first producer to see it reaps the dead worker's queue.

A watch that lost Redis (an outage, a Sentinel failover) judges no death for one
heartbeat TTL after it reads again: while nobody could reach the server, no
worker could renew its key either, so keys may have lapsed on a live fleet (or a
promoted replica may hold none). Workers beat again within an interval; a node
still silent after the TTL is dead, and reported then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis as redis_lib
from redis import Redis

from routing import names
from routing.fleet.reaper import reap_dead_workers
from routing.fleet.registry import Liveness, Registry

log = logging.getLogger(__name__)


#: A node dead this long is dropped from the view (calls to it then fail as if it were never known).
forget_dead_after_s = 60.0
#: How often the members of followed pools (see :meth:`WorkerWatch.follow_pools`) are re-read.
pool_members_every_s = 1.0


class WorkerWatch:
    def __init__(self, registry: Registry, interval_s: float, on_death: Callable[[str], None]) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.on_death = on_death
        self._view: dict[str, Liveness] = {}
        self._dead_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pools: Callable[[], Iterable[str]] | None = None
        self._members_read_at = 0.0
        #: Deaths whose handler failed (a Redis blip): handled again on the next refresh, never forgotten.
        self._unhandled: set[str] = set()
        #: Set when a refresh fails; the next one that reads starts a quiet period (see the module docstring).
        self._cut_off = False
        self._quiet_until = 0.0

    def follow_pools(self, pools: Callable[[], Iterable[str]]) -> None:
        """Also watch every worker of the pools ``pools()`` names (asked every ``pool_members_every_s``).

        For hint calls: any worker of their pool may have taken one from the shared
        queue, so the death of any of them must be seen.
        """
        self._pools = pools

    def _add_pool_members(self) -> None:
        """Start watching workers of followed pools not in the view yet (one ``SMEMBERS`` per pool).

        A newcomer enters the view as live: if it is in fact dead (not reaped yet),
        the refresh that follows reports its death.
        """
        now = time.monotonic()
        if self._pools is None or now - self._members_read_at < pool_members_every_s:
            return
        self._members_read_at = now
        pools = sorted(set(self._pools()))
        if not pools:
            return
        pipe = self.registry.redis.pipeline(transaction=False)
        for pool in pools:
            pipe.smembers(names.pool_workers_key(pool))
        members = set().union(*pipe.execute())
        with self._lock:
            for node in members - set(self._view):
                self._view[node] = Liveness(live=True, in_flight=0, concurrency=1)

    def watch(self, node: str, liveness: Liveness | None = None) -> None:
        with self._lock:
            if liveness is not None or node not in self._view:
                self._view[node] = liveness or Liveness(live=True, in_flight=0, concurrency=1)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flagship-watch", daemon=True)
                self._thread.start()

    def get(self, node: str) -> Liveness | None:
        return self._view.get(node)

    def refresh(self) -> None:
        self._add_pool_members()
        with self._lock:
            nodes = list(self._view)
        if not nodes:
            return
        fresh = self.registry.liveness(nodes)
        now = time.monotonic()
        if self._cut_off:
            self._cut_off = False
            self._quiet_until = now + self.registry.settings.heartbeat_ttl_s
            log.warning("worker watch reads Redis again: judging no death for %.1f s",
                        self.registry.settings.heartbeat_ttl_s)
        if now < self._quiet_until:
            return  # the view keeps what it saw before the outage until the workers had time to beat
        with self._lock:
            died = [node for node, view in fresh.items() if self._ended(self._view.get(node), view)]
            self._view.update(fresh)
            for node, view in fresh.items():
                if view.live:
                    self._dead_since.pop(node, None)
                elif now - self._dead_since.setdefault(node, now) > forget_dead_after_s:
                    del self._view[node], self._dead_since[node]
        for node in died:
            log.warning("worker %s stopped heartbeating (or restarted)", node)
        self._report_deaths([*died, *(self._unhandled - set(died))])

    def _report_deaths(self, nodes: list[str]) -> None:
        """Call ``on_death`` for each node; one whose handler fails is retried on the next refresh."""
        for node in nodes:
            try:
                self.on_death(node)
            except Exception:  # the pending calls waiting on this death must not be forgotten
                log.exception("handling the death of %s failed; retrying on the next refresh", node)
                self._unhandled.add(node)
            else:
                self._unhandled.discard(node)

    @staticmethod
    def _ended(before: Liveness | None, now: Liveness) -> bool:
        """A live run of the node is gone: no heartbeat, or a new run under the same name."""
        if before is None or not before.live:
            return False
        return not now.live or not now.same_run(before.incarnation)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except redis_lib.RedisError as exc:
                self._cut_off = True
                log.warning("worker watch refresh failed: %s", exc)
            except Exception:  # the watch thread is every pending call's liveness: it must survive anything
                log.exception("worker watch refresh failed")


def reap_on_death(redis: Redis) -> Callable[[str], None]:
    """A watch's ``on_death``: move what the dead worker held or had queued (whoever sees it first does)."""

    def reap(node: str) -> None:
        try:
            reap_dead_workers(redis)
        except Exception:  # the watch thread must survive; the next refresh retries
            log.exception("reaping after the death of %s failed", node)

    return reap
