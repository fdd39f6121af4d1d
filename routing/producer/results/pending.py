"""The calls a producer waits for: one future each, settled from a published or stored result.

:class:`PendingCalls` is the result listener's bookkeeping (``routing.producer.results.listener``
adds the connection and its thread): what is pending, settling from stored results
(``MGET`` in batches), failing calls by their tag, forgetting a call nobody waits
for any more (its late result is then dropped).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery import Celery
from redis import Redis

from routing.producer.results import outcome

#: Celery's result key (and channel) for a task id.
RESULT_KEY_PREFIX = "celery-task-meta-"
#: Keys per ``MGET`` when reading many pending calls.
read_batch = 1000


@dataclass
class Pending:
    future: Future[Any]
    #: What the caller wants to know about the call later (see :meth:`PendingCalls.fail_where`).
    tag: Any
    subscribed: bool = True  # to its own result channel (it was not sent naming the reply channel)
    since: float = 0.0  # time.monotonic() when it was expected
    next_read: float = 0.0  # when the safety sweep reads its key next


class PendingCalls:
    """Pending calls by result channel (``RESULT_KEY_PREFIX`` + task id), under one lock."""

    def __init__(self, app: Celery, redis: Redis) -> None:
        self.app = app
        self.redis = redis
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        #: Calls settled that had a subscription of their own (the listener rotates its connection after many).
        self._settled = 0

    def _wake(self) -> None:
        """Tell the listener's thread that something changed (the listener overrides it)."""

    def pending(self) -> int:
        """How many calls are waited for."""
        with self._lock:
            return len(self._pending)

    def fail_where(self, error_for: Callable[[Any], BaseException | None]) -> int:
        """Fail every pending call for whose tag ``error_for`` returns an error; returns how many failed.

        A call whose result was stored just before (not yet delivered) gets its result instead.
        """
        with self._lock:
            doomed = [(channel, error) for channel, p in self._pending.items()
                      if (error := error_for(p.tag)) is not None]
        if not doomed:
            return 0
        failed, settled = 0, self._read([channel for channel, _ in doomed])
        for channel, error in doomed:
            if channel not in settled and (pending := self._take(channel)) is not None:
                pending.future.set_exception(error)
                failed += 1
        self._wake()
        return failed

    def pending_where(self, wanted: Callable[[Any], bool]) -> dict[str, Any]:
        """Task id -> tag of the pending calls whose tag ``wanted`` accepts (a snapshot)."""
        with self._lock:
            return {channel[len(RESULT_KEY_PREFIX):]: p.tag for channel, p in self._pending.items() if wanted(p.tag)}

    def settle_stored(self, task_ids: list[str]) -> set[str]:
        """Settle the calls among ``task_ids`` whose final result is stored (one ``MGET``); returns those settled."""
        settled = self._read([RESULT_KEY_PREFIX + task_id for task_id in task_ids])
        return {channel[len(RESULT_KEY_PREFIX):] for channel in settled}

    def _read(self, channels: list[str]) -> set[str]:
        """Settle the calls of ``channels`` whose final result is stored (``MGET`` in batches); those settled."""
        settled: set[str] = set()
        for start in range(0, len(channels), read_batch):
            batch = channels[start:start + read_batch]
            settled.update(channel for channel, raw in zip(batch, self.redis.mget(batch))
                           if raw is not None and self._settle(channel, raw))
        return settled

    def discard(self, task_id: str) -> None:
        """Stop waiting for a call: never sent, or nobody waits for it any more (a late result is dropped)."""
        self._take(RESULT_KEY_PREFIX + task_id)

    def _take(self, channel: str) -> Pending | None:
        with self._lock:
            pending = self._pending.pop(channel, None)
            self._settled += pending is not None and pending.subscribed
        return pending

    def _settle(self, channel: str, raw: bytes) -> bool:
        """Settle the call of ``channel`` from a stored result; False if not final or not pending."""
        return self._settle_meta(channel, outcome.decoded(self.app.backend, raw))

    def _settle_meta(self, channel: str, meta: dict[str, Any] | BaseException) -> bool:
        if not outcome.final(meta):
            return False
        pending = self._take(channel)
        if pending is None:
            return False  # already settled (the message and the read-back both arrived), or forgotten
        outcome.settle(pending.future, self.app.backend, meta)
        return True
