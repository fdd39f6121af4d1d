"""Call results, pushed by Redis to one listener thread per client: waiting costs nothing.

Celery's Redis result backend stores a result with ``SET`` and ``PUBLISH``es it
on a channel named after the key, in one transaction. The listener subscribes to
the channel of every pending call and, once Redis confirms the subscription,
reads the key once (the result may have been stored before), then settles the
call's :class:`concurrent.futures.Future`. A thread waiting on a call sleeps on
that future's condition: no polling, and no Redis command per waiting call.
After a lost connection the listener resubscribes and re-reads every pending key.
With a Sentinel URL the new connection goes to the current primary, so a failover
is followed without a restart; ``on_reconnect`` then tells the producer, whose
orphan sweep looks for calls the dead primary took with it.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from celery import Celery, states
from celery.backends.redis import RedisBackend, SentinelBackend

from routing.connect import is_sentinel, redis_client

log = logging.getLogger(__name__)

#: Celery's result key (and channel) for a task id.
RESULT_KEY_PREFIX = "celery-task-meta-"
#: Longest sleep between attempts to get a lost pub/sub connection back.
max_reconnect_backoff_s = 2.0
#: Settled calls after which the listener moves to a fresh connection (subscribed to what is still
#: pending) instead of unsubscribing channel by channel: one reply per call saved.
rotate_after = 5000


class ListenerBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, minus its own per-call subscription on send.

    The producer's :class:`ResultListener` subscribes instead; Celery's result
    consumer would open a second subscription that nobody drains.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class ListenerSentinelBackend(SentinelBackend):  # type: ignore[misc]
    """The same over Sentinel (``result_backend_transport_options`` name the primary)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def listener_backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting that makes a Celery app use :class:`ListenerBackend` (or its Sentinel twin)."""
    backend = ListenerSentinelBackend if is_sentinel(redis_url) else ListenerBackend
    return f"{__name__}:{backend.__name__}+{redis_url}"


@dataclass
class Pending:
    future: Future[Any]
    #: What the caller wants to know about the call later (see :meth:`ResultListener.fail_where`).
    tag: Any


class ResultListener:
    def __init__(self, app: Celery, redis_url: str) -> None:
        self.app = app
        self.redis = redis_client(redis_url)
        #: Called (on the listener thread; keep it short) once the listener is subscribed again after a lost
        #: connection: the server may be a new primary that never saw some calls (``routing.producer.sweep``).
        self.on_reconnect: Callable[[], None] | None = None
        #: Set after a lost connection: the next confirmation of the home channel is a reconnect.
        self._reconnected = False
        #: Confirmations of the home channel on the current pub/sub object (a second one: redis-py reconnected it).
        self._home_confirms = 0
        self._pubsub = self.redis.pubsub()
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._settled = 0
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Always subscribed, so the connection never sits unsubscribed with unread replies (no busy loop).
        self._home = f"flagship:results:{uuid.uuid4().hex}"
        self._subscribe: list[str] = [self._home]

    def expect(self, task_id: str, tag: Any = None) -> Future[Any]:
        """A future settled with the call's return value (or its error); register before sending."""
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        channel = RESULT_KEY_PREFIX + task_id
        with self._lock:
            self._pending[channel] = Pending(future, tag)
            self._subscribe.append(channel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flagship-results", daemon=True)
                self._thread.start()
        self._wake()
        return future

    def fail_where(self, error_for: Callable[[Any], BaseException | None]) -> int:
        """Fail every pending call for whose tag ``error_for`` returns an error; returns how many failed.

        A call whose result was stored just before (not yet delivered) gets its result instead.
        """
        with self._lock:
            doomed = [(channel, error) for channel, p in self._pending.items()
                      if (error := error_for(p.tag)) is not None]
        if not doomed:
            return 0
        failed = 0
        for (channel, error), raw in zip(doomed, self.redis.mget([channel for channel, _ in doomed])):
            if raw is not None and self._settle(channel, raw):
                continue
            pending = self._take(channel)
            if pending is not None:
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
        if not task_ids:
            return set()
        channels = [RESULT_KEY_PREFIX + task_id for task_id in task_ids]
        return {task_id for task_id, channel, raw in zip(task_ids, channels, self.redis.mget(channels))
                if raw is not None and self._settle(channel, raw)}

    def discard(self, task_id: str) -> None:
        """Stop waiting for a call that was never sent."""
        self._take(RESULT_KEY_PREFIX + task_id)

    def _take(self, channel: str) -> Pending | None:
        with self._lock:
            pending = self._pending.pop(channel, None)
            self._settled += pending is not None
        return pending

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(2)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._pubsub.close()
        self.redis.close()

    # -- the listener thread -----------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # a full pipe already wakes it; a closed one means stopping
            pass

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._serve()
                return
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError) as exc:
                if self._stop.is_set():
                    return
                log.warning("result listener lost its connection (%s); reconnecting", exc)
                time.sleep(backoff)
                backoff = min(max_reconnect_backoff_s, backoff * 2)
                self._resubscribe_all()
                self._reconnected = True
            except Exception:  # the listener must survive anything; pending calls are re-read
                log.exception("result listener failed; restarting it")
                time.sleep(backoff)
                self._resubscribe_all()

    def _resubscribe_all(self) -> None:
        """A fresh connection subscribed to every pending channel (each key is re-read on confirmation).

        Used after a lost connection, and every ``rotate_after`` settled calls so
        settled channels are dropped with the old connection, not one by one.
        """
        old, self._pubsub = self._pubsub, self.redis.pubsub()
        old.close()
        with self._lock:
            self._subscribe = [self._home, *self._pending]
            self._settled = 0
            self._home_confirms = 0

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        watched_sock: Any = None
        while not self._stop.is_set():
            if self._settled >= rotate_after:
                self._resubscribe_all()
            with self._lock:
                subscribe, self._subscribe = self._subscribe, []
            if subscribe:
                self._pubsub.subscribe(*subscribe)
            sock = self._pubsub.connection._sock if self._pubsub.connection is not None else None
            if sock is not watched_sock:
                if watched_sock is not None:
                    selector.unregister(watched_sock)
                if sock is not None:
                    selector.register(sock, selectors.EVENT_READ)
                watched_sock = sock
            self._drain_messages()
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj == self._wake_r:
                    os.read(self._wake_r, 4096)

    def _home_confirmed(self) -> None:
        """The home channel's subscription confirmed: after a lost connection (ours or redis-py's), say so."""
        self._home_confirms += 1
        if not (self._reconnected or self._home_confirms > 1) or self.on_reconnect is None:
            self._reconnected = False
            return
        self._reconnected = False
        try:
            self.on_reconnect()
        except Exception:  # the listener outlives its callback
            log.exception("result listener's reconnect callback failed")

    def _drain_messages(self) -> None:
        if self._pubsub.connection is None:
            return
        confirmed: list[str] = []
        while (message := self._pubsub.get_message(timeout=0)) is not None:
            channel = message["channel"].decode()
            if channel == self._home:
                if message["type"] == "subscribe":
                    self._home_confirmed()
                continue
            if message["type"] == "message":
                self._settle(channel, message["data"])
            elif message["type"] == "subscribe":
                confirmed.append(channel)
        if confirmed:
            for channel, raw in zip(confirmed, self.redis.mget(confirmed)):
                if raw is not None:
                    self._settle(channel, raw)

    def _settle(self, channel: str, raw: bytes) -> bool:
        """Settle the call of ``channel`` from a stored result; False if not final or not pending."""
        meta = self.app.backend.decode_result(raw)
        if meta.get("status") not in states.READY_STATES:
            return False
        pending = self._take(channel)
        if pending is None:
            return False  # already settled (the message and the read-back both arrived)
        if meta["status"] == states.SUCCESS:
            pending.future.set_result(meta["result"])
        else:
            pending.future.set_exception(self.app.backend.exception_to_python(meta["result"]))
        return True
