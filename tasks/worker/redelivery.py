"""Effectively once for completed work: a call delivered again whose result is stored is not run again.

A call comes again when kombu restores it after the visibility timeout (it sets
``redelivered``), when a reaper or a producer's sweep moves it off a dead worker
(the reaper counts deliveries in a header), or when a producer resends it after it
was lost (``names.RESENT_HEADER``). Only such messages are checked, with one
``GET`` of the result key: the normal path costs nothing. A stored result means
the call completed before its worker died unacknowledged: the worker answers
from the store (``Ignore``: nothing is stored again, the message is acknowledged).
Without one the call runs again, counted as a rerun: it may have partly run
before (the upper bound on duplicate executions that ``flagship status`` shows).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import states
from celery.exceptions import Ignore
from redis import Redis

from routing import names
from routing.broker.deadletter import DELIVERIES_HEADER

log = logging.getLogger(__name__)


#: A call reaching its worker this long after it was sent may be the late original of a resent copy
#: (a producer resends a call it found nowhere for ``routing.producer.recovery.sweep.lost_grace_s``, 1 s): checked too.
late_after_s = 0.5
#: Task ids of reruns kept in ``names.RERUNS_KEY`` (the newest).
reruns_kept = 100_000


def delivered_before(request: Any) -> bool:
    """Whether the message was delivered to a worker before, or resent by its producer."""
    info = getattr(request, "delivery_info", None) or {}
    return bool(info.get("redelivered") or getattr(request, "redelivered", None)
                or getattr(request, DELIVERIES_HEADER, None) or getattr(request, names.RESENT_HEADER, None))


def arrived_late(route: Any) -> bool:
    """Whether the call was sent long enough ago that a producer may have resent it meanwhile."""
    sent_at = route.get("sent_at") if isinstance(route, dict) else None
    return isinstance(sent_at, (int, float)) and time.time() - sent_at > late_after_s


def answer_from_store(task: Any, redis: Redis, route: Any = None, copy: bool = False) -> None:
    """Raise ``Ignore`` if this call may have run before and its result is stored; count reruns otherwise.

    Checked (one pipelined round trip) only for a message delivered before or resent, a
    ``copy`` (another delivery of a call this worker held: ``tasks.worker.turns``), and for one
    that arrives late (it may be the original of a resent copy, held by a worker that was paused
    or starved between the broker's pop and its un-acked record): the normal path costs nothing.
    """
    request = task.request
    again = copy or delivered_before(request)
    if not (again or arrived_late(route)):
        return
    pipe = redis.pipeline(transaction=False)
    pipe.get(task.backend.get_key_for_task(request.id))
    pipe.zscore(names.RESENT_KEY, request.id)
    stored, resent_at = pipe.execute()
    meta = task.backend.decode_result(stored) if stored else {}
    if meta.get("status") in states.READY_STATES:
        redis.hincrby(names.STATS_KEY, "answered_from_store", 1)
        log.info("call %s came again after it completed (%s): answered from the store", request.id, meta["status"])
        raise Ignore()
    if again or resent_at is not None:
        pipe = redis.pipeline(transaction=False)
        pipe.hincrby(names.STATS_KEY, "reruns", 1)
        pipe.zadd(names.RERUNS_KEY, {request.id: time.time()})  # which calls: a duplicate is accounted per id
        pipe.zremrangebyrank(names.RERUNS_KEY, 0, -reruns_kept - 1)
        pipe.execute()
        log.warning("call %s came again without a stored result: running it again", request.id)
