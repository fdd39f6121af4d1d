"""The producer's handle on one submitted call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from routing.errors import CallTimeout, SessionWorkerUnavailable

if TYPE_CHECKING:
    from routing.producer.session import Session


class CallFuture:
    """Waits for a call's result while watching the worker it was sent to.

    A strict call whose worker dies after it was queued becomes
    ``SessionWorkerUnavailable`` as soon as the producer's watch sees the death,
    not after a timeout. Wait on futures from one thread (Celery's result consumer
    is not thread-safe); submit many, then wait on each.
    """

    def __init__(self, session: Session, op: str, result: AsyncResult, target: str | None,
                 incarnation: str | None = None, kwargs: dict[str, Any] | None = None,
                 rehydrate: bool = False) -> None:
        self.session = session
        self.op = op
        self.kwargs = kwargs or {}
        self.rehydrate = rehydrate
        #: The worker (and its run) the call was sent to; None: the pool's shared queue.
        self.target = target
        self.incarnation = incarnation
        self._result = result
        self._value: Any = None
        self._done = False
        #: The worker that ran the call, once known.
        self.node: str | None = None
        self.submitted_at = time.monotonic()
        #: When the producer saw the result (set by ``result`` and ``gather``).
        self.completed_at: float | None = None

    @property
    def id(self) -> str:
        return str(self._result.id)

    def done(self) -> bool:
        return self._done or self._result.ready()

    def result(self, timeout_s: float | None = None) -> Any:
        if self._done:
            return self._value
        client = self.session.client
        slice_s = client.settings.watch_interval_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = slice_s if deadline is None else max(0.0, min(slice_s, deadline - time.monotonic()))
            try:
                envelope = self._result.get(timeout=wait_s, propagate=True, disable_sync_subtasks=False)
                break
            except CeleryTimeout:
                if not self.worker_gone() or self._result.ready():
                    if deadline is not None and time.monotonic() >= deadline:
                        raise CallTimeout(self.session.id, self.op, timeout_s) from None
                    continue
                assert self.target is not None
                lost = SessionWorkerUnavailable(self.session.id, self.target)
            except SessionWorkerUnavailable as exc:
                # The call was moved off its dead worker and refused where it landed.
                lost = exc
            if not self.rehydrate or lost.node != self.target:
                raise lost
            return self._retry_rehydrated(None if deadline is None else deadline - time.monotonic())
        self.node = envelope["node"]
        self._value = envelope["value"]
        self._done = True
        self.completed_at = self.completed_at or time.monotonic()
        self.session._ran_on(self.node)
        return self._value

    def _retry_rehydrated(self, timeout_s: float | None) -> Any:
        """The worker died with this call: rebuild the session elsewhere and run the call again there."""
        assert self.target is not None
        self.session.client._rehydrate(self.session, self.target, self.incarnation)
        retry = self.session.client._send(self.session, self.op, self.kwargs, rehydrate=False)
        value = retry.result(timeout_s)
        self.node, self._value, self._done, self.completed_at = retry.node, value, True, retry.completed_at
        return value

    def worker_gone(self) -> bool:
        """The strict worker run this call waits on is gone (per the producer's watch; no round trip)."""
        if self.target is None or not self.session.affinity.strict:
            return False
        view = self.session.client.watch.get(self.target)
        return view is None or not view.live or not view.same_run(self.incarnation)


def gather(futures: list[CallFuture], timeout_s: float | None = None, poll_s: float = 0.01,
           on_done: Callable[[CallFuture], None] | None = None) -> list[Any]:
    """Wait for calls running in parallel, noting when each finished; results in submission order.

    ``on_done`` is called as each call completes (for progress displays). A call
    that failed on its worker raises when results are collected, after the others
    finished; a strict call whose worker died raises as soon as that is seen (a
    rehydrating session instead reruns it, and such reruns happen in the order
    they are noticed, not the order they were submitted).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(futures)
    while pending:
        for future in list(pending):
            if not future.done() and not future.worker_gone():
                continue
            if not future.done():
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            future.completed_at = future.completed_at or time.monotonic()
            pending.remove(future)
            if on_done is not None:
                on_done(future)
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                f = pending[0]
                raise CallTimeout(f.session.id, f.op, timeout_s)
            time.sleep(poll_s)
    return [f.result(timeout_s) for f in futures]
