"""The producer's half of ``queue_timeout_s``: a call still queued at its deadline is taken back and failed.

Every call of a pool with a queue timeout carries an absolute deadline in its
route; the worker refuses a call whose turn comes after it (``QueueTimeout``).
That alone would leave a call waiting behind a worker busy for minutes, so the
producer keeps its own deadline for each such call, in memory (no Redis work on
the call path). One thread, asleep until the earliest deadline, looks for the
calls that passed it in the queues they may sit in (one ``LRANGE`` per queue)
and takes each found one out with ``LREM``. Only a call removed that way is
failed here, with ``QueueTimeout``, and its claim-checked arguments deleted: it
can never run. A call no longer in a queue is held by a worker, which starts it
or answers ``QueueTimeout`` itself; it is looked for again now and then (with
backoff) in case a dead worker's calls come back to a queue. Either way exactly
one side decides, so clock skew can never make a call both fail and run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from redis import Redis

from routing.broker import claims
from routing.broker.envelope import task_id_of
from routing.errors import QueueTimeout
from routing.producer.recovery.watcher import CallWatcher

log = logging.getLogger(__name__)

#: Operations sent without a deadline: a batch's chunks queue behind each other by design (``session.map``,
#: ``ModuleRef.batch``, ``Client.map``), so they are bounded by ``max_queued``, not by the queue timeout.
UNTIMED_OPS = frozenset({"map"})

#: Deadlines this close together share one sweep (one read of each queue): a call fails at most this late.
batch_window_s = 0.1

#: First look again for a call a worker held at its deadline after this long; doubling up to the maximum.
recheck_after_s = 0.5
recheck_max_s = 5.0
#: A call held by a worker is looked for until this long past its deadline, then left to the worker (which
#: refuses to start it late anyway): a call that never settles is not read again forever.
recheck_for_s = 300.0

#: Task ids as they appear in a queued kombu message (``"id": "<uuid>"`` in its headers).
_TASK_ID = re.compile(rb'"id": ?"([0-9a-f-]{36})"')

#: ``ResultListener.fail_where``: fails the pending calls for whose tag the function returns an error.
FailWhere = Callable[[Callable[[Any], BaseException | None]], int]


def start_by(queue_timeout_s: float | None) -> dict[str, float]:
    """The route fields a worker checks: start by ``deadline`` (epoch seconds, this host's clock) or not at all."""
    if queue_timeout_s is None:
        return {}
    return {"deadline": time.time() + queue_timeout_s, "queue_timeout_s": queue_timeout_s}


@dataclass
class _Tracked:
    task_id: str
    #: The result listener's tag of the call (matched by identity to fail exactly this call).
    tag: Any
    #: Queues the call may wait in: the one it was sent to, and the pool's shared queue.
    queues: tuple[str, ...]
    session_id: str
    op: str
    timeout_s: float
    claims: dict[str, str] = field(default_factory=dict)
    #: Wait before the next look after finding it held by a worker.
    backoff_s: float = recheck_after_s
    #: When its deadline passed here (monotonic).
    due_at: float = 0.0


class DeadlineSweeper(CallWatcher[_Tracked]):
    """Needs a client without ``decode_responses``: a queue may hold anything, and ``LREM`` must match bytes."""

    def __init__(self, redis: Redis, fail_where: FailWhere) -> None:
        super().__init__("flagship-deadlines")
        self.redis = redis
        self.fail_where = fail_where
        self._due: list[tuple[float, int, str]] = []  # (monotonic time to look, tie-breaker, task id)
        self._seq = itertools.count()

    def track(self, task_id: str, reply: Future[Any], tag: Any, queues: tuple[str, ...], timeout_s: float,
              session_id: str, op: str, claimed: dict[str, str]) -> None:
        """Fail ``reply`` with ``QueueTimeout`` if the call is still queued ``timeout_s`` from now."""
        queues = tuple(dict.fromkeys(queues))  # sent to the shared queue: it is named twice
        entry = _Tracked(task_id, tag, queues, session_id, op, timeout_s, claimed, due_at=time.monotonic() + timeout_s)
        with self._cond:
            heapq.heappush(self._due, (entry.due_at, next(self._seq), task_id))  # forgotten ones are skipped
            self._watch(task_id, entry, reply)
            if self._due[0][2] == task_id:  # due before whatever the thread sleeps for (usually not: no wake-up)
                self._cond.notify()

    #: Calls whose deadline is still watched.
    tracked = CallWatcher.watched

    # -- the sweeper thread --------------------------------------------------------

    def _run(self) -> None:
        while True:
            due = self._next_due()
            if due is None:
                return
            try:
                self._sweep(due)
            except Exception as exc:  # the thread must survive (a lost connection): look again later
                log.warning("queue deadline sweep failed (%s); retrying", exc,
                            exc_info=not isinstance(exc, redis_lib.RedisError))
                self._recheck(due)

    def _next_due(self) -> list[_Tracked] | None:
        """Sleep until some tracked call is due; returns every due one (None: stopping)."""
        with self._cond:
            while not self._stop:
                while self._due and self._due[0][2] not in self._watched:
                    heapq.heappop(self._due)
                now = time.monotonic()
                if self._due and self._due[0][0] + batch_window_s <= now:
                    due = []
                    while self._due and self._due[0][0] <= now:
                        entry = self._watched.get(heapq.heappop(self._due)[2])
                        if entry is not None:
                            due.append(entry)
                    return due
                self._cond.wait(self._due[0][0] + batch_window_s - now if self._due else None)
        return None

    def _sweep(self, due: list[_Tracked]) -> None:
        queues = sorted({queue for entry in due for queue in entry.queues})
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.lrange(queue, 0, -1)
        wanted = {entry.task_id: entry for entry in due}
        found: list[tuple[str, bytes, _Tracked]] = []  # (queue, raw message, call)
        for queue, items in zip(queues, pipe.execute()):
            for raw in items:
                for match in _TASK_ID.findall(raw):
                    task_id = match.decode()
                    if task_id in wanted and task_id_of(raw) == task_id:
                        found.append((queue, raw, wanted[task_id]))
        removed: dict[str, _Tracked] = {}
        if found:
            pipe = self.redis.pipeline(transaction=False)
            for queue, raw, _ in found:
                pipe.lrem(queue, 1, raw)
            for (_, _, entry), count in zip(found, pipe.execute()):
                if count:
                    removed[entry.task_id] = entry
        self._fail(list(removed.values()))
        self._recheck([entry for entry in due if entry.task_id not in removed])

    def _fail(self, removed: list[_Tracked]) -> None:
        """Calls taken out of their queue: they can never run, so they fail here."""
        if not removed:
            return
        doomed = {id(entry.tag): entry for entry in removed}

        def error_for(tag: Any) -> BaseException | None:
            entry = doomed.get(id(tag))
            if entry is None or entry.tag is not tag:
                return None
            return QueueTimeout(entry.session_id, entry.op, entry.timeout_s)

        for entry in removed:  # before the caller hears of it: a failed call has left nothing behind
            self.forget(entry.task_id)
            claims.discard(self.redis, entry.session_id, entry.claims)
        self.fail_where(error_for)

    def _recheck(self, held: list[_Tracked]) -> None:
        """Calls a worker held at their deadline: the worker decides; look again later while they wait."""
        now = time.monotonic()
        with self._cond:
            for entry in held:
                if now - entry.due_at > recheck_for_s:
                    self._watched.pop(entry.task_id, None)
                elif entry.task_id in self._watched:
                    heapq.heappush(self._due, (now + entry.backoff_s, next(self._seq), entry.task_id))
                    entry.backoff_s = min(recheck_max_s, entry.backoff_s * 2)
