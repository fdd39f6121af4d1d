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

Moved and resent calls go to the head of their queue (the end workers pop next), the
oldest send first (``routing.fleet.moves``, :meth:`OrphanSweep.resend`).

After a broker failover (the result listener is back on a server, maybe a new
primary that never saw the last writes) the same sweep runs over **every** pool
with pending calls, strict calls included: a strict call found nowhere is resent
to its worker's direct queue (the same run: its route header names it), an
orphaned one is moved back there. A call that cannot be resent within
``max_sweep_s`` of the failover fails with ``ServerUnavailable`` (never a hang).

A worker answers a resent or redelivered call whose result is already stored
from the store (``tasks/worker/redelivery.py``), so completed work never runs twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis as redis_lib
from celery import Celery
from redis import Redis

from routing import names
from routing.errors import ServerUnavailable
from routing.fleet import task_view
from routing.fleet.reaper import move_unacked
from routing.producer.binding import Waiting, redacted_argsrepr
from routing.producer.publish import Publisher
from routing.producer.recovery.whereabouts import Suspect, locate
from routing.producer.results.listener import ResultListener
from routing.settings import redact_url

log = logging.getLogger(__name__)

#: A call found nowhere is sent again only if it is still nowhere this long after.
lost_grace_s = 1.0
#: How long a pool is swept after a death (at least; longer while some call is still suspect).
sweep_window_s = 6.0
#: A sweep never goes on longer than this after the last death.
max_sweep_s = 60.0
#: After ``max_sweep_s``, a pool with calls still suspect is swept this often until they resolve.
slow_pass_s = 5.0
#: Resent task ids are remembered this long (``names.RESENT_KEY``), for a late original to find.
resent_retention_s = 3600.0


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
        #: Pools swept after a failover: their strict calls are looked for too.
        self._failover: set[str] = set()
        # The listener says when it is back on a server after a lost connection (maybe a new primary).
        results.on_reconnect = self.on_failover
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

    def on_failover(self) -> None:
        """The broker connection came back (a failover, a restart): look for every pending call, strict too."""
        pools = {w.pool for w in self.results.pending_where(_carries_args).values()}
        if pools:
            log.warning("broker connection back: looking for lost calls of %s", ", ".join(sorted(pools)))
        self.schedule(pools, failover=True)

    def schedule(self, pools: Iterable[str], failover: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            for pool in pools:
                self._due[pool] = (now + self.window_s, now + max_sweep_s)
                if failover:
                    self._failover.add(pool)
            if self._thread is None:  # started before it is published: close() may join it at any time
                thread = threading.Thread(target=self._run, name="flagship-sweep", daemon=True)
                thread.start()
                self._thread = thread
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
                            self._failover.discard(pool)

    def sweep(self, pool: str) -> int:
        """One pass over the pool's pending hint calls (all calls after a failover); returns how many are suspect."""
        wanted = _carries_args if pool in self._failover else _resendable
        pending = self.results.pending_where(lambda w: wanted(w) and w.pool == pool)
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
        self._requeue(pool, orphans, pending)
        unsent = self._resend(pool, lost, pending)
        for task_id in [*orphans, *lost]:
            if task_id not in unsent:  # one not resent stays suspect: the next pass tries again
                suspects.pop(task_id, None)
        return len(suspects)

    def _requeue(self, pool: str, orphans: dict[str, str], pending: dict[str, Any]) -> None:
        if not orphans:
            return
        by_queue: dict[str, set[str]] = {}
        for task_id, tag in orphans.items():
            by_queue.setdefault(_queue_for(pending[task_id]), set()).add(tag)
        moved = 0
        for queue, tags in by_queue.items():
            moved += move_unacked(self.redis, _tag_in(tags), queue)
        if moved:
            self.redis.hincrby(names.STATS_KEY, "orphans_requeued", moved)
            log.warning("moved %d un-acked call(s) of %s no live worker holds back to a queue", moved, pool)

    def _resend(self, pool: str, lost: list[str], pending: dict[str, Any]) -> set[str]:
        """Resend the calls found nowhere, per queue in their send order; returns those that could not be sent."""
        unsent: set[str] = set()
        if not lost:
            return unsent
        settled = self.results.settle_stored(lost)  # a last look: a result may have landed meanwhile
        by_queue: dict[str, list[str]] = {}
        for task_id in sorted((t for t in lost if t not in settled), key=lambda t: _sent_at(pending[t])):
            by_queue.setdefault(_queue_for(pending[task_id]), []).append(task_id)
        for queue, task_ids in by_queue.items():
            try:
                self.resend(queue, [(task_id, pending[task_id]) for task_id in task_ids])
            except Exception as exc:  # the broker may still be changing hands: the next pass tries again
                unsent.update(task_ids)
                for task_id in task_ids:
                    self._give_up_after_failover(pool, task_id, pending[task_id], exc)
        resent = [task_id for task_ids in by_queue.values() for task_id in task_ids if task_id not in unsent]
        if resent:
            self.redis.hincrby(names.STATS_KEY, "resent", len(resent))
            log.warning("resent %d call(s) of %s lost with a dead worker or primary: %s", len(resent), pool,
                        ", ".join(resent[:5]))
        return unsent

    def _give_up_after_failover(self, pool: str, task_id: str, waiting: Waiting, exc: Exception) -> None:
        """A lost call that could not be resent: retried on the next pass, failed once the sweep's limit passed."""
        due = self._due.get(pool)
        if due is None or time.monotonic() < due[1]:
            log.warning("could not resend %s of %s (%s); retrying", task_id, pool, exc)
            return
        url = redact_url(str(self.app.conf.broker_url))
        error = ServerUnavailable(url, f"call {task_id} was lost with the broker and could not be resent ({exc})")
        self.results.fail_where(lambda w: error if w is waiting else None)

    def resend(self, queue: str, calls: list[tuple[str, Waiting]]) -> None:
        """Send lost calls (in their send order) again to ``queue``, same task ids, onto its head, oldest nearest.

        A hint call goes to its pool's shared queue, a strict one to its worker's direct queue
        (``_queue_for``). The messages are the router's (``Publisher.prepare``), pushed with one
        ``RPUSH`` to the end workers pop next: all of them at once, the oldest popped first. (A
        message only ``send_task`` can send goes behind the calls waiting there.) The result
        listener still waits on those ids; a worker that finds a stored result for a resent call
        answers from the store instead of running it.
        """
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)  # before sending: a late original must find the mark
        pipe.zadd(names.RESENT_KEY, {task_id: now for task_id, _ in calls})
        pipe.zremrangebyscore(names.RESENT_KEY, 0, now - resent_retention_s)
        pipe.execute()
        publisher = Publisher(self.app, self.redis)
        messages = []
        for task_id, waiting in calls:
            args = waiting.args
            assert args is not None
            messages.append(publisher.prepare(
                names.CALL_TASK, args, queue, task_id, reply_to=self.results.reply_channel,
                shadow=task_view.task_name(args[1], args[2]), argsrepr=redacted_argsrepr(args),
                headers={**(waiting.trace or {}), names.RESENT_HEADER: 1}))
        for message in messages:
            if message.payload is None:
                publisher.push(message)
        if payloads := [message.payload for message in reversed(messages) if message.payload is not None]:
            self.redis.rpush(queue, *payloads)


def _resendable(tag: Any) -> bool:
    return isinstance(tag, Waiting) and not tag.strict and tag.args is not None


def _carries_args(tag: Any) -> bool:
    """A call that can be resent, strict or hint (strict calls keep their arguments in Sentinel mode)."""
    return isinstance(tag, Waiting) and tag.args is not None and tag.pool is not None


def _tag_in(tags: set[str]) -> Callable[[str, str | None], bool]:
    return lambda tag, _routing_key: tag in tags


def _sent_at(waiting: Waiting) -> float:
    """When the router sent the call (its route's ``sent_at``); unknown ones last."""
    try:
        return float(waiting.args[3]["sent_at"])  # type: ignore[index]
    except Exception:  # no route as the router writes it
        return float("inf")


def _queue_for(waiting: Waiting) -> str:
    """Where a lost call goes again: a strict call to its worker's direct queue, a hint call to the shared one."""
    assert waiting.pool is not None
    if waiting.strict and waiting.target:
        return names.worker_queue(waiting.target)
    return names.pool_queue(waiting.pool)
