"""A worker's bookkeeping of the sessions it serves: which exist, their TTLs, ping sequence numbers."""

from __future__ import annotations

import threading
import time

from routing import validate
from routing.errors import SessionNotFound
from routing.fleet.sessions import SessionStore

#: A session seen to exist is not looked up again for this long.
session_cache_ttl_s = 5.0


class SessionBook:
    def __init__(self, store: SessionStore, default_ttl_s: float) -> None:
        self.store = store
        self.default_ttl_s = default_ttl_s
        self._lock = threading.Lock()
        self._known: dict[str, float] = {}  # session id -> when to look it up again
        self._ttls: dict[str, float] = {}
        self._touched: dict[str, float] = {}
        self._seqs: dict[str, int] = {}

    def ensure(self, session_id: str, ttl_s: float) -> None:
        """Refuse calls of sessions that were closed or expired; note live ones for a TTL renewal.

        A raw message may carry any JSON: an id that is not a valid session id (an int
        would share a key with the string session of the same digits, and break
        sorting in housekeeping) or a TTL Redis would refuse is an ``InvalidArgument``,
        refused before anything is noted.
        """
        session_id = validate.session_id(session_id, "call")
        ttl_s = validate.ttl(ttl_s, "call", "the route's ttl_s")
        now = time.monotonic()
        if self._known.get(session_id, 0.0) < now:
            if not self.store.exists(session_id):
                self._known.pop(session_id, None)
                raise SessionNotFound(session_id)
            self._known[session_id] = now + session_cache_ttl_s
        with self._lock:
            self._touched[session_id] = ttl_s
            self._ttls[session_id] = ttl_s

    def ttl(self, session_id: str) -> float:
        return self._ttls.get(session_id, self.default_ttl_s)

    def next_seq(self, session_id: str) -> int:
        """1, 2, 3, ... per session on this worker (calls of a session never run at once)."""
        with self._lock:
            self._seqs[session_id] = seq = self._seqs.get(session_id, 0) + 1
        return seq

    def take_touched(self) -> dict[str, float]:
        """Sessions that ran calls since the last heartbeat, with their TTLs (the beat renews them)."""
        with self._lock:
            touched, self._touched = self._touched, {}
        return touched

    def sessions(self) -> set[str]:
        return set(self._ttls)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._known.pop(session_id, None)
            self._seqs.pop(session_id, None)
            self._ttls.pop(session_id, None)
