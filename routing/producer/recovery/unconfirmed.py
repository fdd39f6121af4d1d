"""Sends whose outcome is unknown: a push that failed after its bytes may have reached the server.

A connection error or a timeout while pushing a call (``LPUSH``) does not say
whether the server applied it: the lost part may be the reply. Telling the caller
"not sent" would make it send again under a new task id, and the call would run
twice. So the call stays pending (its claims too) and one thread per producer looks
for it, every ``look_every_s``:

- its result is stored: settled from the store;
- in its queue or the pool's shared queue (``LPOS`` of the exact message), or
  un-acknowledged (kombu's un-acked hash holds its delivery tag): it was sent, and
  from here on it is an ordinary pending call;
- nowhere, twice ``lost_grace_s`` apart (a worker's pop-to-record window is
  milliseconds): it was not applied (or its worker died right after popping it).
  It is sent again under the same task id, marked resent (``names.RESENT_HEADER``,
  and ``names.RESENT_KEY`` for a late original), so a worker that finds its result
  stored answers from the store.

If it can be neither found nor resent within ``outcome_bound_s`` of the failed push
(the server stays out of reach), the call fails with ``CallOutcomeUnknown``: it may or
may not have run. Its claim-checked arguments are left to expire with the session
(a copy of the call may still run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from redis import Redis

from routing import names
from routing.broker.envelope import UNACKED_KEY, task_id_of
from routing.broker.failures import BROKER_ERRORS
from routing.errors import CallOutcomeUnknown
from routing.producer.publish import Outgoing, Publisher
from routing.producer.recovery.deadlines import FailWhere
from routing.producer.recovery.watcher import CallWatcher

log = logging.getLogger(__name__)

#: How often an unconfirmed call is looked for.
look_every_s = 0.25
#: A call found nowhere is resent only if it is still nowhere this long after (as the orphan sweep does).
lost_grace_s = 1.0
#: A call neither found nor resent this long after its push failed fails with ``CallOutcomeUnknown``.
outcome_bound_s = 30.0
#: Resent task ids are remembered this long (``names.RESENT_KEY``), for a late original to find.
resent_retention_s = 3600.0


def maybe_applied(message: Outgoing, error: BaseException) -> bool:
    """Whether a push that raised ``error`` may have been applied: bytes left, then the connection failed."""
    return message.written and isinstance(error, BROKER_ERRORS) and not isinstance(error, redis_lib.ResponseError)


@dataclass
class _Unconfirmed:
    message: Outgoing
    #: The result listener's tag of the call (matched by identity to fail exactly this call).
    tag: Any
    pool: str
    session_id: str
    op: str
    since: float
    error: str
    #: Every push that may have been applied: (payload, delivery tag); a resend adds one.
    copies: list[tuple[str | None, str | None]] = field(default_factory=list)
    missing_since: float | None = None


class UnconfirmedSends(CallWatcher[_Unconfirmed]):
    """Looks for calls whose push may have failed (see the module docstring); one thread, idle when none."""

    def __init__(self, redis: Redis, publisher: Publisher, settle_stored: Callable[[list[str]], set[str]],
                 fail_where: FailWhere) -> None:
        super().__init__("flagship-unconfirmed")
        self.redis = redis
        self.publisher = publisher
        self.settle_stored = settle_stored
        self.fail_where = fail_where
        options = publisher.app.conf.broker_transport_options or {}
        self.unacked_key = str(options.get("unacked_key") or UNACKED_KEY)

    def look_for(self, message: Outgoing, reply: Future[Any], tag: Any, pool: str, session_id: str, op: str,
                 error: BaseException) -> None:
        """The push of ``message`` failed with ``error`` after bytes may have left: find it, or resend it."""
        log.warning("the push of call %s to %s failed (%s): it may have been applied; looking for it",
                    message.task_id, message.queue, error)
        entry = _Unconfirmed(message, tag, pool, session_id, op, time.monotonic(), f"{type(error).__name__}: {error}",
                             [(message.payload, message.delivery_tag)])
        with self._cond:
            self._watch(message.task_id, entry, reply)
            self._cond.notify()

    #: Calls still looked for.
    unconfirmed = CallWatcher.watched

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._watched:
                    self._cond.wait()
                if self._stop:
                    return
                calls = list(self._watched.values())
            for entry in calls:
                try:
                    self._look(entry)
                except Exception as exc:  # the server may still be out of reach: look again, until the bound
                    log.info("looking for call %s failed (%s)", entry.message.task_id, exc,
                             exc_info=not isinstance(exc, redis_lib.RedisError))
                self._give_up_after_bound(entry)
            with self._cond:
                self._cond.wait(look_every_s)

    def _look(self, entry: _Unconfirmed) -> None:
        task_id = entry.message.task_id
        if task_id not in self._open() or self.settle_stored([task_id]):
            self.forget(task_id)
            return
        if self._found(entry):
            log.warning("call %s was sent after all (its push's reply was lost)", task_id)
            self.forget(task_id)
            return
        now = time.monotonic()
        if entry.missing_since is None:
            entry.missing_since = now
        elif now - entry.missing_since >= lost_grace_s:
            self._resend(entry)

    def _open(self) -> set[str]:
        with self._cond:
            return set(self._watched)

    def _found(self, entry: _Unconfirmed) -> bool:
        """Whether any copy of the call is queued or un-acknowledged."""
        queues = list(dict.fromkeys([entry.message.queue, names.pool_queue(entry.pool)]))
        pipe = self.redis.pipeline(transaction=False)
        scans = []  # per reply: a whole queue to scan for the task id, or a position / a yes-no
        for payload, delivery_tag in entry.copies:
            for queue in queues:
                if payload is not None:
                    pipe.lpos(queue, payload)  # None, or its position (0 included)
                else:  # sent through send_task: kombu built the message, only its task id is known
                    pipe.lrange(queue, 0, -1)
                scans.append(payload is None)
            if delivery_tag is not None:
                pipe.hexists(self.unacked_key, delivery_tag)
                scans.append(False)
        task_id = entry.message.task_id
        for scan, reply in zip(scans, pipe.execute()):
            if (any(task_id_of(raw) == task_id for raw in reply) if scan
                    else reply is not None and reply is not False):
                return True
        return False

    def _resend(self, entry: _Unconfirmed) -> None:
        """Send the call again under its task id, marked resent (nowhere twice: it was not applied)."""
        copy = self.publisher.resent(entry.message, names.RESENT_HEADER)
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)  # before sending: a late original must find the mark
        pipe.zadd(names.RESENT_KEY, {copy.task_id: now})
        pipe.zremrangebyscore(names.RESENT_KEY, 0, now - resent_retention_s)
        pipe.execute()
        try:
            self.publisher.push(copy)
        except BaseException:
            if copy.written:  # maybe applied again: look for this copy too
                entry.copies.append((copy.payload, copy.delivery_tag))
                entry.missing_since = None
            raise
        self.redis.hincrby(names.STATS_KEY, "resent", 1)
        log.warning("call %s was not applied by the push that failed: resent under the same task id",
                    copy.task_id)
        self.forget(copy.task_id)

    def _give_up_after_bound(self, entry: _Unconfirmed) -> None:
        task_id = entry.message.task_id
        if time.monotonic() - entry.since < outcome_bound_s or task_id not in self._open():
            return
        self.forget(task_id)
        error = CallOutcomeUnknown(entry.session_id, entry.op, f"call {task_id}: its push failed ({entry.error}) and "
                                   f"it could be neither found nor resent within {outcome_bound_s:.0f} s")
        log.error("%s", error)
        self.fail_where(lambda tag: error if tag is entry.tag else None)
