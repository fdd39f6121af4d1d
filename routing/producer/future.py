"""The producer's handle on one submitted call, and ``gather`` for many."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import as_completed
from typing import Any

from routing.errors import CallTimeout, SessionWorkerUnavailable
from routing.producer.router import Binding, Router, Sent


class CallFuture:
    """Waits for a call's result while watching the worker it was sent to.

    A strict call whose worker dies after it was queued becomes
    ``SessionWorkerUnavailable`` as soon as the producer's watch sees the death,
    not after a timeout (or, with ``rehydrate``, runs again on the rebuilt
    session). The client's result listener settles it: waiting is a sleep, from
    any number of threads.
    """

    def __init__(self, router: Router, binding: Binding, op: str, kwargs: dict[str, Any], sent: Sent,
                 rehydrate: bool = False) -> None:
        self.router = router
        self.binding = binding
        self.op = op
        self.kwargs = kwargs
        self.rehydrate = rehydrate
        self.sent = sent
        self._value: Any = None
        self._done = False
        #: The worker that ran the call, once known.
        self.node: str | None = None
        self.submitted_at = time.monotonic()
        #: When the producer saw the result (set by ``result`` and ``gather``).
        self.completed_at: float | None = None

    @property
    def id(self) -> str:
        return self.sent.task_id

    @property
    def target(self) -> str | None:
        """The worker the call was sent to; None: the pool's shared queue."""
        return self.sent.target

    def done(self) -> bool:
        return self._done or self.sent.reply.done()

    def worker_gone(self) -> bool:
        """The strict worker run this call waits on is gone (per the producer's watch; no round trip)."""
        return self.router.worker_gone(self.binding, self.sent)

    def result(self, timeout_s: float | None = None) -> Any:
        if self._done:
            return self._value
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            envelope = self.router.wait(self.binding, self.sent, self.op, timeout_s)
        except SessionWorkerUnavailable as lost:
            # Seen dead by the watch, or moved off its dead worker and refused where it landed.
            if not self.rehydrate or lost.node != self.sent.target:
                raise
            return self._retry_rehydrated(None if deadline is None else deadline - time.monotonic())
        self._settle(envelope["node"], envelope["value"])
        self.router.ran_on(self.binding, self.node)
        return self._value

    def _settle(self, node: str | None, value: Any, completed_at: float | None = None) -> None:
        self.node, self._value, self._done = node, value, True
        self.completed_at = self.completed_at or completed_at or time.monotonic()

    def _retry_rehydrated(self, timeout_s: float | None) -> Any:
        """The worker died with this call: rebuild the session elsewhere and run the call again there."""
        self.router.rehydrate(self.binding, self.sent.target, self.sent.incarnation)
        retry = CallFuture(self.router, self.binding, self.op, self.kwargs,
                           self.router.send(self.binding, self.op, self.kwargs))
        value = retry.result(timeout_s)
        self._settle(retry.node, value, retry.completed_at)
        return value


def gather(futures: list[CallFuture], timeout_s: float | None = None,
           on_done: Callable[[CallFuture], None] | None = None) -> list[Any]:
    """Wait for calls running in parallel, noting when each finished; results in submission order.

    ``on_done`` is called as each call completes (for progress displays). A call
    that failed on its worker raises when results are collected, after the others
    finished; a strict call whose worker died raises as soon as that is seen (a
    rehydrating session instead reruns it, and such reruns happen in the order
    they are noticed, not the order they were submitted). Woken by the result
    listener as each call settles: no polling, O(1) work per call.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    by_reply = {f.sent.reply: f for f in futures if not f._done}
    for future in futures:
        if future._done and on_done is not None:
            on_done(future)
    try:
        for reply in as_completed(by_reply, timeout_s):
            future = by_reply[reply]
            if isinstance(reply.exception(), SessionWorkerUnavailable):
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))  # raise or rerun
            future.completed_at = future.completed_at or time.monotonic()
            if on_done is not None:
                on_done(future)
    except FutureTimeout:
        late = next(f for f in futures if not f.done())
        raise CallTimeout(late.binding.session_id, late.op, timeout_s) from None
    return [f.result(timeout_s) for f in futures]
