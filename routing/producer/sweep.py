"""Bringing back the hint calls a dead worker took with it: run on deaths, never on the call path.

Kombu's Redis transport pops a message (``BRPOP``) before it records it as
un-acknowledged, and the reaper moves only what a dead worker had queued or
reported holding. So when a worker of a pool dies, this producer looks for each
of its pending hint calls of that pool, a few times over the next seconds:

- result stored: settle the call;
- in a queue of the pool (shared or direct): fine, a worker will take it;
- un-acknowledged and held by a live worker: fine, it is running;
- un-acknowledged and held by no live worker, across two heartbeats of every
  live worker of the pool: an orphan of the dead worker; moved to the shared queue;
- nowhere, twice, ``lost_grace_s`` apart (a live worker's pop-to-record window is
  milliseconds): lost in the dead worker's pop window; sent again to the shared
  queue with the same task id, marked resent (``names.RESENT_HEADER``).

A worker answers a resent or redelivered call whose result is already stored
from the store (``tasks/worker/redelivery.py``), so completed work never runs twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from celery import Celery
from redis import Redis

from routing import names, task_view
from routing.producer.binding import Waiting, redacted_argsrepr
from routing.producer.results import ResultListener
from routing.reaper import UNACKED_KEY, move_unacked

log = logging.getLogger(__name__)

#: A call found nowhere is sent again only if it is still nowhere this long after.
lost_grace_s = 1.0
#: How long a pool is swept after a death (at least; longer while some call is still suspect).
sweep_window_s = 6.0
#: A sweep never goes on longer than this after the last death.
max_sweep_s = 60.0
#: Beats of every live worker (after the first look) that must pass without it listing an un-acked call.
beats_to_wait = 2
#: After ``max_sweep_s``, a pool with calls still suspect is swept this often until they resolve.
slow_pass_s = 5.0
#: Resent task ids are remembered this long (``names.RESENT_KEY``), for a late original to find.
resent_retention_s = 3600.0


def task_id_of(raw: Any) -> str | None:
    """The task id in a kombu message envelope (None if it is not one: poison is someone else's business)."""
    try:
        envelope = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        task_id = envelope["headers"]["id"]
    except (ValueError, TypeError, KeyError):
        return None
    return task_id if isinstance(task_id, str) else None


@dataclass
class Whereabouts:
    """Where a pool's calls are right now (read in this order: queues, un-acked, live holders)."""

    queued: set[str]
    #: Task id -> delivery tag of un-acknowledged deliveries.
    unacked: dict[str, str]
    #: Live node -> (delivery tags it reported holding, its last beat's timestamp).
    holders: dict[str, tuple[set[str], str]]

    def held(self, tag: str) -> bool:
        return any(tag in tags for tags, _ in self.holders.values())


def locate(redis: Redis, pool: str, task_ids: set[str]) -> Whereabouts:
    """Scan the pool's queues, the un-acked hash and the live workers' reports for ``task_ids``."""
    queues = [names.pool_queue(pool)] + [names.worker_queue(node) for node, p in
                                         redis.hgetall(names.DIRECT_QUEUES_KEY).items() if p == pool]
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        pipe.lrange(queue, 0, -1)
    queued = {task_id for items in pipe.execute() for raw in items if (task_id := task_id_of(raw)) in task_ids}
    unacked = {}
    for tag, raw in redis.hscan_iter(UNACKED_KEY):
        try:
            task_id = task_id_of(json.loads(raw)[0])
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        if task_id in task_ids:
            unacked[task_id] = tag
    nodes = sorted(redis.smembers(names.pool_workers_key(pool)))
    pipe = redis.pipeline(transaction=False)
    for node in nodes:
        pipe.exists(names.heartbeat_key(node))
        pipe.hmget(names.worker_key(node), "holding", "last_beat")
    replies = pipe.execute()
    holders = {}
    for i, node in enumerate(nodes):
        live, (holding, last_beat) = replies[2 * i], replies[2 * i + 1]
        if live and last_beat is not None:
            holders[node] = (set(json.loads(holding or "[]")), last_beat)
    return Whereabouts(queued, unacked, holders)


@dataclass
class Suspect:
    """A pending call not where it should be, since ``since``."""

    missing: bool
    since: float
    tag: str | None = None
    #: Live node -> the distinct beats seen since the call was first seen un-held (the first is the baseline).
    beats: dict[str, set[str]] = field(default_factory=dict)

    def beaten_since(self, where: Whereabouts) -> bool:
        """Every live worker beat twice since the call was first seen un-held, never listing it.

        Twice, not once: a worker lists a call from Celery's ``task_received``, a moment
        after kombu's un-acked record; one beat may fall in between (a newcomer starts
        its baseline).
        """
        for node, (_, beat) in where.holders.items():
            self.beats.setdefault(node, set()).add(beat)
        return all(len(self.beats[node]) > beats_to_wait for node in where.holders)


class OrphanSweep:
    """One thread per client, idle until a worker dies; sweeps that worker's pool for a few seconds."""

    def __init__(self, app: Celery, redis: Redis, results: ResultListener, beat_interval_s: float) -> None:
        self.app = app
        self.redis = redis
        self.results = results
        self.pass_interval_s = min(0.5, max(0.05, beat_interval_s / 2))
        self.window_s = max(sweep_window_s, 4 * beat_interval_s + 2 * lost_grace_s)
        self._lock = threading.Lock()
        self._due: dict[str, tuple[float, float]] = {}  # pool -> (sweep at least until, never after)
        self._suspects: dict[str, dict[str, Suspect]] = {}  # pool -> task id -> suspicion
        self._last_pass: dict[str, float] = {}  # pool -> when it was last swept (monotonic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pools_pending(self) -> set[str]:
        """Pools with pending hint calls (the watch follows every worker of these)."""
        return {w.pool for w in self.results.pending_where(_resendable).values()}

    def on_death(self, node: str) -> None:
        """A watch's death report: sweep the dead node's pool (every pool with hint calls if unknown)."""
        try:
            pool = self.redis.hget(names.DIRECT_QUEUES_KEY, node)
        except redis_lib.RedisError:
            pool = None
        self.schedule([pool] if pool else self.pools_pending())

    def schedule(self, pools: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for pool in pools:
                self._due[pool] = (now + self.window_s, now + max_sweep_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flagship-sweep", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.pass_interval_s if self._due else None)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = dict(self._due)
            for pool, (until, limit) in due.items():
                if now > limit and now - self._last_pass.get(pool, 0.0) < slow_pass_s:
                    continue  # suspects outlived the window: keep looking, slowly, until they resolve
                self._last_pass[pool] = now
                try:
                    suspects = self.sweep(pool)
                except Exception:  # the sweep must survive anything; the next pass retries
                    log.exception("sweeping pool %s for lost calls failed", pool)
                    suspects = 1
                if now > until and not suspects:
                    with self._lock:
                        if self._due.get(pool) == (until, limit):
                            del self._due[pool]
                            self._suspects.pop(pool, None)

    def sweep(self, pool: str) -> int:
        """One pass over the pool's pending hint calls; returns how many are still suspect."""
        pending = self.results.pending_where(lambda w: _resendable(w) and w.pool == pool)
        suspects = self._suspects.setdefault(pool, {})
        for task_id in list(suspects):
            if task_id not in pending:
                del suspects[task_id]
        settled = self.results.settle_stored(list(pending))
        open_ids = {task_id for task_id in pending if task_id not in settled}
        if not open_ids:
            return 0
        where = locate(self.redis, pool, open_ids)
        now = time.monotonic()
        orphans: dict[str, str] = {}
        lost: list[str] = []
        for task_id in open_ids:
            tag = where.unacked.get(task_id)
            if task_id in where.queued or (tag is not None and where.held(tag)):
                suspects.pop(task_id, None)
                continue
            suspect = suspects.get(task_id)
            if suspect is None or suspect.missing != (tag is None) or suspect.tag != tag:
                suspects[task_id] = Suspect(tag is None, now, tag,
                                            {node: {beat} for node, (_, beat) in where.holders.items()})
            elif tag is not None and suspect.beaten_since(where):
                orphans[task_id] = tag
            elif tag is None and now - suspect.since >= lost_grace_s:
                lost.append(task_id)
        self._requeue(pool, orphans)
        self._resend(pool, lost, pending)
        for task_id in [*orphans, *lost]:
            suspects.pop(task_id, None)
        return len(suspects)

    def _requeue(self, pool: str, orphans: dict[str, str]) -> None:
        if not orphans:
            return
        tags = set(orphans.values())
        moved = move_unacked(self.redis, lambda tag, _routing_key: tag in tags, names.pool_queue(pool))
        if moved:
            self.redis.hincrby(names.STATS_KEY, "orphans_requeued", moved)
            log.warning("moved %d un-acked call(s) no live worker of %s holds to its shared queue", moved, pool)

    def _resend(self, pool: str, lost: list[str], pending: dict[str, Any]) -> None:
        if not lost:
            return
        settled = self.results.settle_stored(lost)  # a last look: a result may have landed meanwhile
        resent = [task_id for task_id in lost if task_id not in settled]
        for task_id in resent:
            self.resend(task_id, pending[task_id])
        if resent:
            self.redis.hincrby(names.STATS_KEY, "resent", len(resent))
            log.warning("resent %d hint call(s) of %s lost with a dead worker: %s", len(resent), pool,
                        ", ".join(resent[:5]))


    def resend(self, task_id: str, waiting: Waiting) -> None:
        """Send a lost hint call again to its pool's shared queue: the same task id, marked resent.

        The result listener still waits on that id; a worker that finds a stored
        result for a resent call answers from the store instead of running it.
        """
        args = waiting.args
        assert args is not None and waiting.pool is not None
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)  # before sending: a late original must find the mark
        pipe.zadd(names.RESENT_KEY, {task_id: now})
        pipe.zremrangebyscore(names.RESENT_KEY, 0, now - resent_retention_s)
        pipe.execute()
        self.app.send_task(names.CALL_TASK, args=args, queue=names.pool_queue(waiting.pool), task_id=task_id,
                           shadow=task_view.task_name(args[1], args[2]), argsrepr=redacted_argsrepr(args),
                           headers={names.RESENT_HEADER: 1})


def _resendable(tag: Any) -> bool:
    return isinstance(tag, Waiting) and not tag.strict and tag.args is not None
