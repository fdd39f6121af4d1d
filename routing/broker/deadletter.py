"""The dead-letter list: messages no worker could run, kept (bounded) with the reason and the raw payload.

Three places write to it: the workers' Redis channel (``routing.broker.celery_config``) for
items that are not even a kombu envelope, the worker's consumer
(``tasks.worker.poison``) for envelopes Celery could not run, and the reaper for a
call delivered ``max_deliveries`` times without completing. An entry is one JSON
object ``{at, queue, reason, task_id, task, node, raw, raw_size}``; the newest
``max_entries`` are kept, and ``dead_lettered`` in ``names.STATS_KEY`` counts them all.
When the message named a task id, the call fails with :class:`DeadLettered`, stored
and published the way Celery's Redis backend stores a result, so a producer waiting
on it is woken at once instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from routing import names
from routing.broker.scripts import source
from routing.errors import DeadLettered
from routing.settings import env_number

log = logging.getLogger(__name__)

#: Message header counting deliveries that ended without completing (worker gone, visibility restore).
DELIVERIES_HEADER = "flagship_deliveries"
#: Celery's result key, also the channel its Redis backend publishes the result on.
RESULT_KEY = "celery-task-meta-{task_id}"
#: How long a dead-lettered call's failure result is kept (Celery's ``result_expires`` here).
result_ttl_s = 3600
#: The ``names.STATS_KEY`` field counting dead-lettered messages.
COUNTER = "dead_lettered"

_STORE_ONCE = source("store_result_once")


@dataclass(frozen=True)
class DeadLetterSettings:
    #: Newest entries kept in the list (``FLAGSHIP_DEADLETTER_MAX``).
    max_entries: int = 1000
    #: Deliveries without completing after which a message is dead-lettered (``FLAGSHIP_MAX_DELIVERIES``).
    max_deliveries: int = 3
    #: Bytes of the raw payload kept per entry (``FLAGSHIP_DEADLETTER_RAW_BYTES``); ``raw_size`` keeps the original.
    raw_limit_bytes: int = 64 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DeadLetterSettings:
        env = os.environ if env is None else env
        return cls(
            max_entries=max(1, env_number(env, "FLAGSHIP_DEADLETTER_MAX", cls.max_entries, int)),
            max_deliveries=max(1, env_number(env, "FLAGSHIP_MAX_DELIVERIES", cls.max_deliveries, int)),
            raw_limit_bytes=env_number(env, "FLAGSHIP_DEADLETTER_RAW_BYTES", cls.raw_limit_bytes, int),
        )


@dataclass(frozen=True)
class Letter:
    """One message going to the dead-letter list."""

    queue: str
    reason: str
    #: The payload as it was popped (or as the reaper found it).
    raw: str | bytes
    task_id: str | None = None
    task: str | None = None
    #: The message's ``reply_to``: the failure is published there too when it is a reply channel.
    reply_to: Any = None


_this_node: str | None = None


def set_this_node(node: str) -> None:
    """Name this process's entries after its Celery node (set when the worker's consumer is built)."""
    global _this_node
    _this_node = node


def this_node() -> str:
    return _this_node or f"{socket.gethostname()}:{os.getpid()}"


def deliveries(headers: Any) -> int:
    """Deliveries without completing recorded in a message's headers (0 when absent or unreadable)."""
    value = headers.get(DELIVERIES_HEADER) if isinstance(headers, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def entry(letter: Letter, node: str, raw_limit_bytes: int) -> dict[str, Any]:
    raw = letter.raw if isinstance(letter.raw, bytes) else letter.raw.encode("utf-8", "surrogatepass")
    return {
        "at": time.time(), "queue": letter.queue, "reason": letter.reason, "task_id": letter.task_id,
        "task": letter.task, "node": node,
        "raw": raw[:raw_limit_bytes].decode("utf-8", "backslashreplace"), "raw_size": len(raw),
    }


def failure_result(task_id: str, reason: str) -> str:
    """``DeadLettered(task_id, reason)`` as Celery's JSON result backend stores a failure."""
    return json.dumps({
        "status": "FAILURE",
        "result": {"exc_type": DeadLettered.__name__, "exc_module": DeadLettered.__module__,
                   "exc_message": [task_id, reason]},
        "traceback": None, "children": [], "task_id": task_id,
        "date_done": datetime.now(UTC).isoformat(),
    })


def record(pipe: Redis, letter: Letter, settings: DeadLetterSettings, node: str | None = None) -> None:
    """Queue on ``pipe`` the commands that dead-letter ``letter`` (inside a transaction or not)."""
    pipe.lpush(names.DEADLETTER_KEY, json.dumps(entry(letter, node or this_node(), settings.raw_limit_bytes)))
    pipe.ltrim(names.DEADLETTER_KEY, 0, settings.max_entries - 1)
    pipe.hincrby(names.STATS_KEY, COUNTER, 1)
    if letter.task_id:
        key = RESULT_KEY.format(task_id=letter.task_id)
        pipe.eval(_STORE_ONCE, 1, key, failure_result(letter.task_id, letter.reason), result_ttl_s,
                  names.reply_channel_or_none(letter.reply_to) or "")


def announce(letter: Letter) -> None:
    """The one log line per dead-lettered message."""
    log.warning("dead-lettered a message from %s (task %s, id %s): %s",
                letter.queue, letter.task or "?", letter.task_id or "?", letter.reason)


def dead_letter(redis: Redis, letter: Letter, settings: DeadLetterSettings | None = None) -> None:
    """Put ``letter`` on the dead-letter list (and fail its call, if it names one); logs once."""
    pipe = redis.pipeline(transaction=False)
    record(pipe, letter, settings or DeadLetterSettings.from_env())
    pipe.execute()
    announce(letter)


def summary(redis: Redis, newest: int = 5) -> dict[str, Any]:
    """For ``flagship status``: entries held, messages dead-lettered ever, the newest entries (without payloads)."""
    pipe = redis.pipeline(transaction=False)
    pipe.llen(names.DEADLETTER_KEY)
    pipe.hget(names.STATS_KEY, COUNTER)
    pipe.lrange(names.DEADLETTER_KEY, 0, max(0, newest - 1))
    held, total, raw_entries = pipe.execute()
    recent = []
    for raw in raw_entries if newest > 0 else []:
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            recent.append({k: item.get(k) for k in ("at", "queue", "reason", "task_id", "task", "node", "raw_size")})
    return {"held": int(held or 0), "total": int(total or 0), "recent": recent}
