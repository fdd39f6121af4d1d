"""Every open call stream of a client, read by the result listener's thread with one blocking ``XREAD``.

One extra connection: the listener's loop sends ``XREAD BLOCK`` for all open streams
without waiting, watches that socket in its selector, reads the reply when it is
readable, hands each entry to its stream's sink (in order), and sends the next
``XREAD``. A stream opened or closed while the read is blocked unblocks it with
``CLIENT UNBLOCK`` from another connection (then the next read names the new set).
The last entry id of each stream is kept: after a lost connection the next read
resumes every stream from there, so nothing is skipped or delivered twice (an entry
not after the last id is dropped, whoever read it). No thread, connection or
polling per stream.
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from redis import Redis

from routing.producer.streams.items import StreamChunk, StreamStatus, decode

__all__ = ["StreamReader"]

log = logging.getLogger(__name__)

#: The longest an ``XREAD`` blocks (it comes back empty and is sent again: a dead connection shows up then).
block_ms = 5000
#: An ``XREAD`` unanswered this long after ``block_ms`` means a lost connection.
reply_grace_s = 5.0

Sink = Callable[[StreamChunk | StreamStatus | str], None]


@dataclass
class _Open:
    call_id: str
    sink: Sink
    last_id: tuple[int, int] = (0, 0)


def _id(raw: Any) -> tuple[int, int]:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("-")
    return int(ms), int(seq or 0)


class StreamReader:
    """The open streams (key -> last id and sink) and the one connection that reads them all."""

    def __init__(self, redis: Redis, wake: Callable[[], None]) -> None:
        #: The listener's client: ``CLIENT UNBLOCK`` and catch-up reads go through its pool.
        self.redis = redis
        self._wake = wake
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._changed = False
        self._conn: Any = None
        self._client_id: int | None = None
        #: When the outstanding ``XREAD`` was sent (None: none is), and whether it was told to unblock.
        self._sent_at: float | None = None
        self._unblocked = False
        self._watched: tuple[Any, Any] = (None, None)  # (selector, socket) the socket is registered in
        #: Connections lost so far (each resumed from the last ids).
        self.losses = 0
        #: ``XREAD`` replies read so far (one may carry entries of many streams).
        self.reads = 0

    def open(self, key: str, call_id: str, sink: Sink) -> None:
        """Read ``key`` from its first entry on; each item goes to ``sink`` (on the listener's thread)."""
        with self._lock:
            self._open[key] = _Open(call_id, sink)
            self._changed = True
        self._wake()

    def close(self, key: str) -> None:
        """Stop reading ``key``; entries still arriving are dropped."""
        with self._lock:
            found = self._open.pop(key, None) is not None
            self._changed = self._changed or found
        if found:
            self._wake()

    @property
    def client_id(self) -> int | None:
        """The reading connection's ``CLIENT ID`` (None: not connected)."""
        return self._client_id if self._conn is not None else None

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def catch_up(self, key: str) -> None:
        """Read what ``key`` holds after its last id directly (``XRANGE``), delivered as the listener would."""
        with self._lock:
            state = self._open.get(key)
            start = state.last_id if state is not None else None
        if start is not None:
            self._deliver(key, self.redis.xrange(key, min=f"({start[0]}-{start[1]}"))

    # -- on the listener's thread ------------------------------------------------

    def step(self, selector: selectors.BaseSelector) -> None:
        """Read a reply that arrived, unblock a read the stream set changed under, send the next read."""
        try:
            self._step(selector)
        except (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError) as exc:
            self.losses += 1
            log.warning("stream reader lost its connection (%s); resuming every stream from its last id", exc)
            self.reset()
            self._step(selector)  # a second failure is the listener's: it backs off and restarts its loop

    def _step(self, selector: selectors.BaseSelector) -> None:
        if self._sent_at is not None:
            if self._conn.can_read(timeout=0):
                reply = self._conn.read_response()
                self._sent_at, self._unblocked = None, False
                self.reads += 1
                self._dispatch(reply)
            elif self._changed and not self._unblocked:
                self.redis.execute_command("CLIENT", "UNBLOCK", self._client_id)
                self._unblocked = True
            elif time.monotonic() - self._sent_at > block_ms / 1000 + reply_grace_s:
                raise redis_lib.TimeoutError(f"no reply to XREAD BLOCK {block_ms} within {reply_grace_s:.0f} s")
        if self._sent_at is None:
            with self._lock:
                self._changed = False
                keys = list(self._open)
                ids = [f"{s.last_id[0]}-{s.last_id[1]}" for s in self._open.values()]
            if keys:
                self._connection().send_command("XREAD", "BLOCK", block_ms, "STREAMS", *keys, *ids)
                self._sent_at = time.monotonic()
        self._watch(selector)

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self.redis.connection_pool.make_connection()
            conn.connect()
            conn.send_command("CLIENT", "ID")
            self._client_id = int(conn.read_response())
            self._conn = conn
        return self._conn

    def _watch(self, selector: selectors.BaseSelector) -> None:
        # redis-py 5-7 keep the socket as ``AbstractConnection._sock`` (tests/test_upstream_seams.py).
        sock = self._conn._sock if self._conn is not None else None
        if (selector, sock) == self._watched:
            return
        self._unwatch()
        if sock is not None:
            selector.register(sock, selectors.EVENT_READ)
        self._watched = (selector, sock)

    def _unwatch(self) -> None:
        selector, sock = self._watched
        if selector is not None and sock is not None:
            try:
                selector.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass
        self._watched = (None, None)

    def reset(self) -> None:
        """Drop the connection (lost, or the listener restarts): the next read resumes from the last ids."""
        self._unwatch()
        conn, self._conn, self._sent_at, self._unblocked = self._conn, None, None, False
        if conn is not None:
            conn.disconnect()

    def _dispatch(self, reply: Any) -> None:
        if not reply:
            return  # timed out, or unblocked
        for key, entries in (reply.items() if isinstance(reply, dict) else reply):
            self._deliver(key.decode() if isinstance(key, bytes) else str(key), entries)

    def _deliver(self, key: str, entries: Any) -> None:
        """Hand each entry after the stream's last id to its sink, in order (under the lock: one deliverer)."""
        with self._lock:
            state = self._open.get(key)
            if state is None:
                return
            for raw_id, fields in entries:
                entry_id = _id(raw_id)
                if entry_id > state.last_id:
                    state.last_id = entry_id
                    state.sink(decode(state.call_id, fields))
