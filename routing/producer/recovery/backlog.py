"""How many calls wait in each queue this producer sends to, so a full one is refused before sending.

A worker's calls wait in its direct queue or, taken from there, held in its memory until
their session's turn (``tasks.worker.turns``): both count, the held ones as the worker
reports them (``held`` in its registry hash).

A pool's ``max_queued`` bounds each worker's direct queue (and the pool's shared
queue at ``max_queued`` per registered worker). Reading a queue's length on every
call would add a round trip, so each queue keeps an estimate: its last ``LLEN``
plus the calls this producer sent there since. The estimate is read again when it
is older than ``refresh_after_s`` or has reached the limit: a call is refused
(``PoolSaturated``, nothing sent) only on a fresh read. Other producers' calls
show up at the next read, so the bound is soft by what they send in that window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from redis import Redis

from routing import names
from routing.errors import PoolSaturated

#: An estimate older than this is read again (one ``LLEN``) before the next call to its queue.
refresh_after_s = 0.25


@dataclass
class _Estimate:
    #: The queue's length at the last read, plus the calls sent there since.
    queued: int
    #: The limit at the last read (the shared queue's depends on the pool's worker count).
    limit: int
    #: When it was read (monotonic).
    read_at: float


class Backlog:
    def __init__(self, redis: Redis, refresh_s: float = refresh_after_s) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._estimates: dict[str, _Estimate] = {}

    def forget(self, queue: str) -> None:
        """Drop ``queue``'s estimate (its worker died or left: the queue is reaped, or read afresh if used again)."""
        with self._lock:
            self._estimates.pop(queue, None)

    def estimated(self) -> int:
        """Queues with an estimate (tests check it stays bounded)."""
        with self._lock:
            return len(self._estimates)

    def has_room(self, queue: str) -> bool:
        """Whether the last estimate of ``queue`` is below its limit (no round trip; unknown: yes)."""
        estimate = self._estimates.get(queue)
        return estimate is None or estimate.queued < estimate.limit

    def admit(self, pool: str, node: str | None, max_queued: int | None) -> None:
        """Count one more call into ``node``'s direct queue (None: the pool's shared queue).

        Raises ``PoolSaturated`` if that queue already holds its limit; the caller sends nothing then.
        """
        if max_queued is None:
            return
        queue = names.worker_queue(node) if node else names.pool_queue(pool)
        now = time.monotonic()
        with self._lock:
            estimate = self._estimates.get(queue)
            if estimate is not None and now - estimate.read_at < self.refresh_s and estimate.queued < estimate.limit:
                estimate.queued += 1
                return
        queued, limit = self._read(queue, pool, max_queued, shared=node is None)
        with self._lock:
            estimate = self._estimates[queue] = _Estimate(queued, limit, now)
            if queued >= limit:
                raise PoolSaturated(pool, node or queue, queued, limit)
            estimate.queued += 1

    def _read(self, queue: str, pool: str, max_queued: int, shared: bool) -> tuple[int, int]:
        """The queue's length and its limit, in one round trip."""
        if not shared:  # the worker's queue, and the calls it took from there but has not started (held)
            pipe = self.redis.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.hget(names.worker_key(names.node_of_worker_queue(queue)), "held")
            queued, held = pipe.execute()
            return int(queued) + max(0, int(held or 0)), max_queued
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.scard(names.pool_workers_key(pool))
        queued, workers = pipe.execute()
        return int(queued), max_queued * max(1, int(workers))
