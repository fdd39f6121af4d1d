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
from typing import Any

from celery import states
from celery.exceptions import Ignore
from redis import Redis

from routing import names

log = logging.getLogger(__name__)

#: Header in which the reaper counts the deliveries of a message it moved back (``routing/reaper.py``).
DELIVERIES_HEADER = "flagship_deliveries"


def delivered_before(request: Any) -> bool:
    """Whether the message was delivered to a worker before, or resent by its producer."""
    info = getattr(request, "delivery_info", None) or {}
    return bool(info.get("redelivered") or getattr(request, "redelivered", None)
                or getattr(request, DELIVERIES_HEADER, None) or getattr(request, names.RESENT_HEADER, None))


def answer_from_store(task: Any, redis: Redis) -> None:
    """Raise ``Ignore`` if this call was delivered before and its result is stored; count reruns otherwise."""
    request = task.request
    if not delivered_before(request):
        return
    meta = task.backend.get_task_meta(request.id, cache=False)
    if meta.get("status") in states.READY_STATES:
        redis.hincrby(names.STATS_KEY, "answered_from_store", 1)
        log.info("call %s came again after it completed (%s): answered from the store", request.id, meta["status"])
        raise Ignore()
    redis.hincrby(names.STATS_KEY, "reruns", 1)
    log.warning("call %s came again without a stored result: running it again", request.id)
