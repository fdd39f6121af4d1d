"""A submitted call as a standard :class:`concurrent.futures.Future` (awaitable too), and ``gather``."""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from collections.abc import Callable, Generator
from concurrent.futures import Future, InvalidStateError, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

from routing import tracing
from routing.errors import CallTimeout, RefNotFound, SessionWorkerUnavailable
from routing.producer.binding import Binding, Sent
from routing.producer.router import Router


class CallFuture(Future[Any]):
    """One call of a session: settles with the operation's JSON result, or its typed error.

    A standard future (``result(timeout=)``, ``exception()``, ``done()``,
    ``add_done_callback``, ``cancel()``; works with ``concurrent.futures.wait``
    and ``as_completed``; any number of threads may wait) and awaitable from
    asyncio. A strict call whose worker dies settles with
    ``SessionWorkerUnavailable`` as soon as the producer's watch sees it, or,
    with ``rehydrate``, runs again on the rebuilt session first (so does a hint
    call its dead worker held, which another worker found without the session's
    refs). ``cancel()``
    revokes a call that has not started (it is then never run).

    A call whose ``result``/``exception`` timed out (``CallTimeout``) and whose
    future its caller then let go of (``session.call(timeout=...)`` does) is
    forgotten by the producer; its late result is dropped. Until then it can be
    waited on again.
    """

    def __init__(self, router: Router, binding: Binding, op: str, kwargs: dict[str, Any], sent: Sent,
                 rehydrate: bool = False, decode: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        #: Turns the operation's JSON into what ``result()`` gives (a module call's ``Prediction``).
        self.decode = decode
        self.router = router
        self.binding = binding
        self.op = op
        self.kwargs = kwargs
        self.rehydrate = rehydrate
        self.sent = sent
        #: The worker that ran the call, once known.
        self.node: str | None = None
        self.submitted_at = time.monotonic()
        #: When the result arrived.
        self.completed_at: float | None = None
        #: The task ids this future waits on (a rehydrated rerun adds its own), for forgetting them.
        self._task_ids = [sent.task_id]
        self._relay = _Relay(self)
        #: The caller's context (its current span), for a rerun sent from a background thread; None: tracing off.
        self._context = contextvars.copy_context() if tracing.tracer() is not None else None
        sent.reply.add_done_callback(self._relay)

    @property
    def id(self) -> str:
        """The call's Celery task id (what Flower shows)."""
        return self.sent.task_id

    @property
    def target(self) -> str | None:
        """The worker the call was sent to; None: the pool's shared queue."""
        return self.sent.target

    def result(self, timeout: float | None = None, *, timeout_s: float | None = None) -> Any:
        """The call's result; ``CallTimeout`` after ``timeout`` seconds (``timeout_s`` is an alias)."""
        timeout = timeout_s if timeout is None else timeout
        try:
            return super().result(timeout)
        except FutureTimeout:
            raise self._timed_out(timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's typed error, or None once it succeeded; ``CallTimeout`` after ``timeout`` seconds."""
        try:
            return super().exception(timeout)
        except FutureTimeout:
            raise self._timed_out(timeout) from None

    def _timed_out(self, timeout: float | None) -> CallTimeout:
        """From now on the listener holds this future weakly: once its caller lets go of it, the call is forgotten."""
        if self._relay.future is not None:
            self._relay.future = None
            weakref.finalize(self, self.router.abandon, self._task_ids)
        return CallTimeout(self.binding.session_id, self.op, timeout)

    def cancel(self) -> bool:
        """Revoke the call if it has not run: it is skipped where it waits. False once it settled."""
        if not super().cancel():
            return False
        self.router.revoke(self.sent.task_id)
        self.router.abandon(self._task_ids)  # nobody waits for its result (a revoked call may never store one)
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    # -- settling (on the result listener's or the watch's thread) ---------------

    def _on_reply(self, reply: Future[Any]) -> None:
        error = reply.exception()
        if self.rehydrate and (isinstance(error, SessionWorkerUnavailable) and error.node == self.sent.target
                               or self._moved_off_its_refs(error)):
            # Rebuilding replays recipes and waits for them: never on the listener's thread.
            rerun = self._rerun_rehydrated if self._context is None else partial(self._context.run,
                                                                                  self._rerun_rehydrated)
            self.router.background(rerun, self.binding.session_id)
            return
        if error is not None:
            self._settle(None, None, error)
            return
        envelope = reply.result()
        self.router.ran_on(self.binding, envelope["node"])
        self._settle(envelope["node"], envelope["value"])

    def _moved_off_its_refs(self, error: BaseException | None) -> bool:
        """A hint call its dead worker held, run by another worker without the session's refs (the reaper moved it)."""
        return isinstance(error, RefNotFound) and self.sent.target not in (None, getattr(error, "node", None))

    def _rerun_rehydrated(self) -> None:
        """The worker died with this call: rebuild the session elsewhere and run the call again there."""
        try:
            self.router.rehydrate(self.binding, self.sent.target, self.sent.incarnation)
            kwargs = self.kwargs
            if isinstance(stream := kwargs.get("stream"), dict) and "id" not in stream:  # a streamed call's rerun
                kwargs = {**kwargs, "stream": {**stream, "id": self.sent.task_id}}  # writes to its caller's stream
            sent = self.router.send(self.binding, self.op, kwargs)
            retry = CallFuture(self.router, self.binding, self.op, kwargs, sent)
        except BaseException as exc:  # typed errors from the rebuild settle this call
            self._settle(None, None, exc)
            return
        self._task_ids.append(retry.id)

        def adopt(_: Future[Any]) -> None:
            error = retry.exception()
            self._settle(retry.node, None if error is not None else retry.result(), error)

        retry.add_done_callback(adopt)

    def _settle(self, node: str | None, value: Any, error: BaseException | None = None) -> None:
        self.node, self.completed_at = node, time.monotonic()
        try:
            if error is None and self.decode is not None:
                try:
                    value = self.decode(value)
                except Exception as exc:  # a reply not of the expected shape: the call's error, not the thread's
                    value, error = None, exc
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)
        except InvalidStateError:  # cancelled meanwhile: the result is dropped
            pass


class _Relay:
    """The reply's callback into its ``CallFuture``: a strong reference until the caller timed out, then a weak one."""

    def __init__(self, future: CallFuture) -> None:
        self.future: CallFuture | None = future
        self.weak = weakref.ref(future)

    def __call__(self, reply: Future[Any]) -> None:
        future = self.future or self.weak()
        if future is not None:
            future._on_reply(reply)


def gather(futures: list[CallFuture], timeout_s: float | None = None,
           on_done: Callable[[CallFuture], None] | None = None) -> list[Any]:
    """Wait for calls running in parallel; results in submission order.

    ``on_done`` is called as each call completes (for progress displays). A call
    that failed on its worker raises when results are collected, after the others
    finished; a strict call whose worker died raises as soon as that is seen (a
    rehydrating session reruns it first). Woken as each call settles: no polling.
    """
    try:
        for future in as_completed(futures, timeout_s):
            if isinstance(future.exception(), SessionWorkerUnavailable):
                raise future.exception()  # type: ignore[misc]
            if on_done is not None:
                on_done(future)  # type: ignore[arg-type]
    except FutureTimeout:
        late = next(f for f in futures if not f.done())
        raise CallTimeout(late.binding.session_id, late.op, timeout_s) from None
    return [f.result() for f in futures]


async def agather(futures: list[CallFuture]) -> list[Any]:
    """``gather`` for asyncio: one event loop waits on any number of calls, no thread each."""
    return list(await asyncio.gather(*futures))
