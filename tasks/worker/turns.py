"""Per-session turns on a worker: one call of a session at a time, in arrival order; waiting calls hold no thread.

Celery hands every task it receives to its pool at once. A call of a session that
already has a call on this worker is *parked* here instead, in arrival order (the
consumer thread receives in queue order), and handed to the pool when the call
before it finishes: a parked call occupies no task thread, so other sessions' calls
run meanwhile. A parked call whose deadline (its pool's queue timeout) passes is
handed over then, out of turn, to fail with ``QueueTimeout`` without running
(``tasks.worker.calls``). A copy of a call already here (the same task id delivered
again, e.g. restored after a broker connection blip) is parked behind the original
and marked, so it is answered from the result store instead of running twice.

Tickets are keyed by delivery tag (unique per delivery), so an original and its
copy are told apart when either finishes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """One delivery of a call, waiting for (or holding) its session's turn."""

    call_id: str
    tag: str
    #: Hands the call to the task pool (runs on whichever thread releases it).
    start: Callable[[], None]
    #: Epoch seconds by which it must start (None: no limit).
    deadline: float | None = None
    #: Another delivery of a call already held here: answered from the store when its turn comes.
    copy: bool = False
    started: bool = False


class SessionTurns:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queues: dict[str, deque[Ticket]] = {}
        self._by_tag: dict[str, tuple[str, Ticket]] = {}
        self._copies: set[str] = set()  # tags of started copies, until the call asks (``is_copy``)
        self._deadlines: list[tuple[float, int, str, Ticket]] = []
        self._order = itertools.count()
        self._parked = 0
        #: False once the worker shuts down: parked calls stay parked (kombu returns them to their queue).
        self.releasing = True
        self._timer: threading.Thread | None = None

    def arrive(self, session_id: str, ticket: Ticket) -> bool:
        """Queue ``ticket``; True if it holds the turn at once (the caller starts it), False if parked."""
        with self._lock:
            queue = self._queues.setdefault(session_id, deque())
            ticket.copy = ticket.copy or any(t.call_id == ticket.call_id for t in queue)
            queue.append(ticket)
            self._by_tag[ticket.tag] = (session_id, ticket)
            if len(queue) == 1 and self.releasing:
                self._mark_started(ticket)
                return True
            self._parked += 1
            if ticket.deadline is not None:
                heapq.heappush(self._deadlines, (ticket.deadline, next(self._order), session_id, ticket))
                self._ensure_timer()
                self._lock.notify_all()
            return False

    def leave(self, tag: str) -> None:
        """The delivery ``tag`` finished (or will never run here): the session's next call gets its turn."""
        with self._lock:
            found = self._by_tag.pop(tag, None)
            if found is None:
                return
            session_id, ticket = found
            self._copies.discard(tag)
            queue = self._queues.get(session_id)
            if queue is not None and ticket in queue:
                queue.remove(ticket)
                if not ticket.started:
                    self._parked -= 1
            nxt = self._next(session_id)
        if nxt is not None:
            self._start(nxt)

    def is_copy(self, tag: str | None) -> bool:
        """Whether the delivery ``tag`` is another delivery of a call this worker held (asked once, at its start)."""
        if tag is None:
            return False
        with self._lock:
            if tag in self._copies:
                self._copies.discard(tag)
                return True
            return False

    def mark_all_copies(self) -> None:
        """Treat every parked call as a copy (this worker was declared dead: the fleet requeued them)."""
        with self._lock:
            for queue in self._queues.values():
                for ticket in queue:
                    if not ticket.started:
                        ticket.copy = True

    def stop_releasing(self) -> None:
        with self._lock:
            self.releasing = False
            self._lock.notify_all()

    def waiting(self) -> int:
        """Calls held here that have not started (parked for their session's turn)."""
        return self._parked

    # -- internals (under the lock unless said) -------------------------------

    def _next(self, session_id: str) -> Ticket | None:
        queue = self._queues.get(session_id)
        if not queue:
            self._queues.pop(session_id, None)
            return None
        head = queue[0]
        if head.started or not self.releasing:
            return None
        self._mark_started(head)
        self._parked -= 1
        return head

    def _mark_started(self, ticket: Ticket) -> None:
        ticket.started = True
        if ticket.copy:
            self._copies.add(ticket.tag)

    def _start(self, ticket: Ticket) -> None:  # outside the lock
        try:
            ticket.start()
        except Exception:  # the pool refused it (shutting down): kombu returns the message to its queue
            log.warning("could not start call %s", ticket.call_id, exc_info=True)

    def _ensure_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._expire_loop, name="flagship-turn-deadlines", daemon=True)
            self._timer.start()

    def _expire_loop(self) -> None:
        """Hand over parked calls whose deadline passed (they fail there with ``QueueTimeout``)."""
        while True:
            due: list[Ticket] = []
            with self._lock:
                now = time.time()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, _, session_id, ticket = heapq.heappop(self._deadlines)
                    queue = self._queues.get(session_id)
                    if ticket.started or queue is None or ticket not in queue or not self.releasing:
                        continue
                    queue.remove(ticket)  # out of turn: it only fails, touching nothing of the session
                    self._mark_started(ticket)
                    self._parked -= 1
                    due.append(ticket)
                wait = self._deadlines[0][0] - now if self._deadlines else None
                if not due:
                    self._lock.wait(wait)
                    continue
            for ticket in due:
                self._start(ticket)


def call_parts(request: Any) -> tuple[str, str, dict[str, Any] | None] | None:
    """``(session id, delivery tag, route)`` of a received ``flagship.call`` request (None: not one to park)."""
    args = request.args if isinstance(request.args, (list, tuple)) else []
    kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
    session_id = args[0] if args else kwargs.get("session_id")
    route = args[3] if len(args) > 3 else kwargs.get("route")
    tag = getattr(request.message, "delivery_tag", None)
    if not isinstance(session_id, str) or tag is None:
        return None
    return session_id, str(tag), route if isinstance(route, dict) else None


def delivery_tag_of(request: Any) -> str | None:
    """The delivery tag of a task request or its ``Context`` (what Celery's postrun and revoked signals pass)."""
    properties = getattr(request, "properties", None)
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    if tag is None:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    return None if tag is None else str(tag)


def start_by(route: dict[str, Any] | None) -> float | None:
    deadline = route.get("deadline") if route else None
    return float(deadline) if isinstance(deadline, (int, float)) and not isinstance(deadline, bool) else None


def parking(process: Callable[[Any], None], turns_of: Callable[[], SessionTurns | None],
            qos_of: Callable[[], Any], call_task: str) -> Callable[[Any], None]:
    """Celery's ``on_task_request`` (hand a request to the pool) behind the session turns.

    A parked call does not count against the prefetch limit (as Celery does for ETA tasks), so
    the worker keeps receiving other sessions' calls behind it; ``max_queued`` bounds them instead.
    """

    def on_task_request(request: Any) -> None:
        turns = turns_of()
        parts = call_parts(request) if turns is not None and request.task.name == call_task else None
        if parts is None:
            return process(request)
        session_id, tag, route = parts
        qos = qos_of()

        def start() -> None:
            if qos is not None:
                qos.decrement_eventually()
            process(request)

        ticket = Ticket(request.id, tag, start, start_by(route))
        assert turns is not None
        if turns.arrive(session_id, ticket):
            return process(request)
        if qos is not None:
            qos.increment_eventually()
        return None

    return on_task_request
