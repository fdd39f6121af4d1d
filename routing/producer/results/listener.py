"""Call results, pushed by Redis to one listener thread per client: waiting costs nothing.

The producer's calls name the listener's *reply channel* (``reply_to``,
:func:`routing.names.reply_channel`) and the workers' result store publishes each
result there besides Celery's key channel (``routing.broker.result_store``): the listener
subscribes once, confirmed before the first call is sent, and settles the call's
:class:`~concurrent.futures.Future` from the message. No Redis command per call,
no polling. A call expected without it (sent by other code) subscribes to its own
channel and reads its key once that is confirmed. After any gap in the reply
channel's subscription (a lost connection, a new primary after a Sentinel failover:
``on_reconnect`` tells the producer's orphan sweep) every pending key is read; as a
safety net for results published elsewhere, keys of calls pending longer than
``stale_after_s`` are read every ``sweep_every_s`` (one ``MGET`` for all).

A connection can die without a word (a host or network failure that sends no TCP
reset): an idle pub/sub socket then never errors. So a connection that has been
silent for ``probe_after_s`` gets a ``PING``; no reply within ``probe_reply_s``
counts as a lost connection (reconnect, re-read every pending key, tell the
sweep). A dead connection is noticed within ``probe_after_s + probe_reply_s`` plus
one turn of the loop (~8 s). The listener's own commands are not retried by
redis-py (``retries=0``): a timeout is a lost connection to it, handled as above.
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
from typing import Any

import redis as redis_lib
from celery import Celery

from routing import names
from routing.broker.connect import redis_client, socket_timeout_s
from routing.producer.results.pending import RESULT_KEY_PREFIX, Pending, PendingCalls
from routing.producer.streams import StreamReader

__all__ = ["RESULT_KEY_PREFIX", "ResultListener"]

log = logging.getLogger(__name__)

#: Longest sleep between attempts to get a lost pub/sub connection back.
max_reconnect_backoff_s = 2.0
#: Settled calls with their own subscription after which the listener moves to a fresh connection
#: (subscribed to what is still pending) instead of unsubscribing channel by channel.
rotate_after = 5000
#: How long the first call waits for the reply channel's subscription to be confirmed (else it subscribes its own).
home_ready_timeout_s = 5.0
#: The safety net: keys of calls pending longer than ``stale_after_s`` are read every ``sweep_every_s``.
sweep_every_s, stale_after_s = 2.0, 2.0
#: A pub/sub connection silent this long gets a ``PING``; no reply within ``probe_reply_s``: it is lost.
probe_after_s, probe_reply_s = 2.0, socket_timeout_s


class ResultListener(PendingCalls):
    def __init__(self, app: Celery, redis_url: str) -> None:
        # No redis-py retries: a lost connection is the listener's to handle (reconnect and re-read).
        super().__init__(app, redis_client(redis_url, retries=0))
        #: Called (on the listener thread; keep it short) once the listener is subscribed again after a lost
        #: connection: the server may be a new primary that never saw some calls (``routing.producer.recovery.sweep``).
        self.on_reconnect: Callable[[], None] | None = None
        #: A lost connection (ours; or a second confirmation of the home channel on one pub/sub: redis-py's).
        self._reconnected, self._home_confirms = False, 0
        self._pubsub = self.redis.pubsub()
        #: When the pub/sub connection last delivered anything, and when an unanswered probe went out.
        self._heard_at, self._probe_sent_at = time.monotonic(), 0.0
        #: Connections lost so far, and when the last loss was noticed (monotonic).
        self.losses, self.lost_at = 0, 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a full pipe already wakes the listener: never block a caller
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The reply channel; always subscribed, so the connection never sits unsubscribed (no busy loop).
        self._home = names.reply_channel(uuid.uuid4().hex)
        #: Set once the reply channel's first subscription is confirmed: calls may name it from then on.
        self._home_ready = threading.Event()
        self._subscribe: list[str] = [self._home]
        self._next_sweep = 0.0
        #: Streamed calls' chunks: one ``XREAD`` for all open streams, on this thread (``routing.producer.streams``).
        self.streams = StreamReader(self.redis, self._wake)

    @property
    def reply_channel(self) -> str:
        """What calls name as ``reply_to`` to have their results published to this listener."""
        return self._home

    def expect(self, task_id: str, tag: Any = None, *, replied: bool = False) -> Future[Any]:
        """A future settled with the call's return value (or its error); register before sending. ``replied``: it
        names :attr:`reply_channel` as ``reply_to`` (no subscription of its own once that one is confirmed)."""
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        channel = RESULT_KEY_PREFIX + task_id
        with self._lock:
            if self._thread is None:  # started before it is published: close() may join it at any time
                (thread := threading.Thread(target=self._run, name="flagship-results", daemon=True)).start()
                self._thread = thread
        if replied and not self._home_ready.is_set():
            self._wake()
            replied = self._home_ready.wait(home_ready_timeout_s)
        with self._lock:
            now = time.monotonic()
            self._pending[channel] = Pending(future, tag, not replied, now, now + stale_after_s)
            if not replied:
                self._subscribe.append(channel)
                self._wake()
        return future

    def close(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(2)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.streams.reset()
        self._pubsub.close()
        self.redis.close()

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
                self.losses, self.lost_at = self.losses + 1, time.monotonic()
                log.warning("result listener lost its connection (%s); reconnecting", exc)
                self.redis.connection_pool.disconnect()  # the pooled connections went the same way, likely
                self.streams.reset()
                time.sleep(backoff)
                backoff = min(max_reconnect_backoff_s, backoff * 2)
                self._resubscribe_all()
                self._reconnected = True
            except Exception:  # the listener must survive anything; pending calls are re-read
                log.exception("result listener failed; restarting it")
                time.sleep(backoff)
                backoff = min(max_reconnect_backoff_s, backoff * 2)
                self._resubscribe_all()

    def _resubscribe_all(self) -> None:
        """A fresh connection (after a lost one, or every ``rotate_after`` settled calls with their own channel)."""
        old, self._pubsub = self._pubsub, self.redis.pubsub()
        old.close()
        self._heard_at, self._probe_sent_at = time.monotonic(), 0.0
        with self._lock:
            self._subscribe = [self._home, *(channel for channel, p in self._pending.items() if p.subscribed)]
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
            self.streams.step(selector)
            self._probe()
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + sweep_every_s
                self._read_replied(sweep=True)
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj == self._wake_r:
                    os.read(self._wake_r, 4096)

    def _probe(self) -> None:
        """``PING`` a connection silent for ``probe_after_s``; one that does not answer in time is lost."""
        if self._pubsub.connection is None or not self._pubsub.subscribed:
            return
        now = time.monotonic()
        if self._probe_sent_at:
            if now - self._probe_sent_at > probe_reply_s:
                raise redis_lib.TimeoutError(f"no reply to a PING within {probe_reply_s:.0f} s (a silent network?)")
        elif now - self._heard_at >= probe_after_s:
            self._pubsub.ping()
            self._probe_sent_at = now

    def _home_confirmed(self) -> None:
        """The reply channel is subscribed: after a gap, read what landed meanwhile; after a lost connection, say so."""
        self._home_confirms += 1
        reconnected, self._reconnected = self._reconnected or self._home_confirms > 1, False
        gap = self._home_ready.is_set()  # not the first subscription: results may have landed meanwhile
        self._home_ready.set()
        if reconnected and self.on_reconnect is not None:
            try:
                self.on_reconnect()
            except Exception:  # the listener outlives its callback
                log.exception("result listener's reconnect callback failed")
        if gap:
            self._read_replied()

    def _read_replied(self, sweep: bool = False) -> None:
        """Settle the calls sent naming the reply channel whose results are stored (``sweep``: those due, each
        read again once it has waited as long again: at 2, 4, 8 ... s)."""
        now, channels = time.monotonic(), []
        with self._lock:
            for channel, p in self._pending.items():
                if not p.subscribed and (not sweep or p.next_read <= now):
                    channels.append(channel)
                    p.next_read = now + max(stale_after_s, now - p.since)
        self._read(channels)

    def _drain_messages(self) -> None:
        if self._pubsub.connection is None:
            return
        to_read: list[str] = []
        while (message := self._pubsub.get_message(timeout=0)) is not None:
            self._heard_at, self._probe_sent_at = time.monotonic(), 0.0
            if message["type"] == "pong":
                continue
            channel = message["channel"].decode()
            if channel == self._home:
                if message["type"] == "subscribe":
                    self._home_confirmed()
                elif message["type"] == "message":
                    self._on_reply(message["data"], to_read)
                continue
            if message["type"] == "message":
                self._settle(channel, message["data"])
            elif message["type"] == "subscribe":
                to_read.append(channel)
        self._read(to_read)

    def _on_reply(self, raw: bytes, to_read: list[str]) -> None:
        """A result on the reply channel (or only its task id, ``{"task_id": ...}``: its key is read)."""
        backend = self.app.backend
        try:
            decoded = backend.decode(raw)
            channel = RESULT_KEY_PREFIX + decoded["task_id"]
            meta = backend.meta_from_decoded(decoded) if "status" in decoded else None
        except Exception:  # not ours to choke on: a call waiting for it has its key read by the sweep
            log.warning("unreadable message on the reply channel %s (%d bytes)", self._home, len(raw))
            return
        if meta is None:
            to_read.append(channel)
        else:
            self._settle_meta(channel, meta)
