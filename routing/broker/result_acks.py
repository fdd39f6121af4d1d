"""Deliveries acknowledged together with their result, in the result store's script.

On a worker whose broker is also its result backend, the script that stores a
call's SUCCESS (``routing.broker.result_store``) also removes the delivery's un-acked
record (kombu's ``ZREM`` + ``HDEL``), atomically with the result, on the task's
own thread. Celery still acknowledges the message afterwards (in the worker's
event loop, as profiled under ``-P threads``); for these deliveries that ack is
only kombu's in-memory bookkeeping (``routing.broker.transport.CountingQoS``): no Redis
round trip, and no wait for the GIL around one. A tag is remembered only when
the script removed a record (the same server, the task's own SUCCESS). A crash
between the two loses nothing: the result is stored, and the message is no
longer redelivered.
"""

from __future__ import annotations

import threading

__all__ = ["remember", "take", "MAX_REMEMBERED"]

#: Tags remembered at most (a tag whose Celery ack never comes, e.g. its channel closed, is dropped oldest first).
MAX_REMEMBERED = 100_000

_lock = threading.Lock()
_tags: dict[str, None] = {}


def remember(tag: str) -> None:
    """``tag``'s un-acked record was removed with its result (on a task thread)."""
    with _lock:
        if len(_tags) >= MAX_REMEMBERED:
            _tags.pop(next(iter(_tags)))
        _tags[tag] = None


def take(tag: str) -> bool:
    """Whether ``tag`` was acknowledged with its result (forgotten from now on)."""
    with _lock:
        return _tags.pop(tag, 0) is None
