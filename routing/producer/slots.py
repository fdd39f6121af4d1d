"""Which of this producer's hint sessions each worker serves from its direct queue (hint routing)."""

from __future__ import annotations

import threading
import time

from routing.fleet.registry import Liveness

#: A hint session keeps its slot of a worker's direct queue while it calls at least once per this many
#: watch intervals (one calling less often asks for a slot again).
direct_hold_intervals = 2


class DirectSlots:
    """Which of this producer's hint sessions a worker serves from its direct queue.

    Hint routing used to ask only "is the bound worker saturated?" of a view up to one
    watch interval old that knows nothing of the calls sent since. A burst went whole
    to the bound workers' direct queues, where no other worker (a new one included)
    can take a call, until a refresh flipped one worker to saturated; the rest of its
    sessions' calls then went to the shared queue and were shared by all, so that
    worker ran dry while the others worked through their backlogs. And at full load a
    worker's in-flight count equals its concurrency most of the time, so most hint
    calls went to the shared queue and sessions wandered between workers.

    Now a worker serves up to ``concurrency`` of this producer's sessions from its
    direct queue (one thread each: a session's calls run one at a time): a session
    holds its slot while it keeps calling, so its calls stay in order on its worker
    even across refreshes; a session without a slot gets one only if one is free and
    the worker is not saturated by calls of others; every other hint call goes to the
    shared queue, where the first free worker, a new one too, takes it at once.
    """

    def __init__(self, hold_s: float) -> None:
        #: A session keeps its slot while it calls at least this often (a closed or moved one frees it then).
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, float]] = {}  # node -> session id -> its last call there (monotonic)
        self._where: dict[str, str] = {}  # session id -> the node whose slot it holds

    def take(self, node: str, session_id: str, view: Liveness) -> bool:
        """Whether this session's call goes to ``node``'s direct queue (it holds a slot there, or gets one)."""
        if not view.accepting:
            return False
        now = time.monotonic()
        with self._lock:
            held = self._held.setdefault(node, {})
            if session_id in held and now - held[session_id] < self.hold_s:
                held[session_id] = now
                return True
            for other, last in list(held.items()):
                if now - last >= self.hold_s:
                    del held[other]
                    if self._where.get(other) == node:
                        del self._where[other]
            if len(held) >= view.concurrency or (not held and view.saturated):
                return False  # its slots are ours already, or its threads are busy with calls of others
            previous = self._where.get(session_id)
            if previous is not None and previous != node:  # the session moved: its old slot is free
                self._held.get(previous, {}).pop(session_id, None)
            held[session_id], self._where[session_id] = now, node
            return True

    def forget_node(self, node: str) -> None:
        """``node`` died or left: its slots are gone (its sessions ask for a slot again wherever they call next)."""
        with self._lock:
            for session_id in self._held.pop(node, {}):
                if self._where.get(session_id) == node:
                    del self._where[session_id]

    def release(self, session_id: str) -> None:
        """The session closed: its slot is free at once."""
        with self._lock:
            node = self._where.pop(session_id, None)
            if node is not None:
                self._held.get(node, {}).pop(session_id, None)

    def size(self) -> tuple[int, int]:
        """Nodes and sessions this producer keeps slots for (tests check both stay bounded)."""
        with self._lock:
            return len(self._held), len(self._where)
