"""A producer's handle on one session: call operations on the worker that holds its state."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from routing import arguments, validate
from routing.broker.failures import translating
from routing.errors import SessionClosed, SessionWorkerUnavailable
from routing.fleet import usage
from routing.pools import Affinity
from routing.producer import batching
from routing.producer.binding import Binding, Sent
from routing.producer.future import CallFuture
from routing.producer.handles import RefMethods
from routing.producer.router import Router


class Session(RefMethods):
    """A producer's handle on a session: its calls go to the worker holding its state.

    Made by :meth:`Client.session` (open) or :meth:`Client.attach` (existing).
    ``call``/``submit`` run allow-listed operations with JSON arguments; the
    DSPy-facing helpers (``lm``, ``predict``, ``rlm``, ``history``, ...) come from
    :class:`~routing.producer.handles.RefMethods`. Safe to share between threads
    for submitting; wait on futures from one thread.
    """

    def __init__(self, router: Router, binding: Binding, rehydrate: bool = False,
                 limits: validate.SizeLimits | None = None) -> None:
        self.router = router
        self.binding = binding
        self.closed = False
        #: Size limits checked before a call is sent (the client's settings; the worker checks its own too).
        self.limits: validate.SizeLimits = limits or validate.Limits()
        #: Rebuild the session on a live worker when its strict worker is gone (see ``submit``).
        self.rehydrate = rehydrate

    @property
    def id(self) -> str:
        """The session id: every call carries it; ``client.attach(id)`` finds the session from another process."""
        return self.binding.session_id

    @property
    def pool(self) -> str:
        """The pool the session was opened on."""
        return self.binding.pool

    @property
    def affinity(self) -> Affinity:
        """How its calls are routed: ``strict_queue``, ``strict_fail_fast`` or ``hint``."""
        return self.binding.affinity

    @property
    def ttl_s(self) -> float:
        """Seconds without a call after which the session expires and its objects are freed."""
        return self.binding.ttl_s

    @property
    def worker(self) -> str | None:
        """Node name of the bound worker (None until a lazy session's first call)."""
        return self.binding.worker

    @property
    def incarnation(self) -> str | None:
        """The run of the bound node holding the session's state."""
        return self.binding.incarnation

    @property
    def rehydrations(self) -> int:
        """How many times this handle rebuilt the session on a new worker."""
        return self.binding.rehydrations

    def usage(self) -> dict[str, Any]:
        """The session's LM usage (``calls``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``,
        ``cache_hits``), its ``budget`` (None: unlimited) and what it ``spent`` against it."""
        return usage.session_usage(self.router.redis, self.id)

    def __repr__(self) -> str:
        return f"<Session {self.id} pool={self.pool} affinity={self.affinity.value} worker={self.worker}>"

    @translating(lambda session: session.router.app.conf.broker_url)
    def submit(self, op: str, /, *, rehydrate: bool | None = None, **kwargs: Any) -> CallFuture:
        """Send ``op(**kwargs)`` to the session's worker; returns at once.

        ``rehydrate`` (default: the session's setting): if the strict worker is
        gone, rebind to a live worker, rebuild the session's refs from their
        recipes, then run the call there. Without it the error is
        ``SessionWorkerUnavailable``.
        """
        return self.submit_decoded(op, kwargs, None, rehydrate=rehydrate)

    def submit_decoded(self, op: str, kwargs: dict[str, Any], decode: Callable[[Any], Any] | None, *,
                       rehydrate: bool | None = None) -> CallFuture:
        """``submit``, with ``decode`` turning the JSON result into what the future gives (module refs use it)."""
        sent, rehydrate = self._send_now(op, kwargs, rehydrate)
        if not isinstance(sent, Sent):  # the strict worker is gone: rebuild, then send there
            sent = sent()
        return CallFuture(self.router, self.binding, op, kwargs, sent, rehydrate, decode)

    def _checked(self, op: str, kwargs: dict[str, Any], rehydrate: bool | None) -> tuple[bool, str | None]:
        """A call's arguments checked before anything is sent: its rehydrate flag and the run it is meant for."""
        if self.closed:
            raise SessionClosed(self.id)
        arguments.call_arguments(op, kwargs, self.limits)
        rehydrate = self.rehydrate if rehydrate is None else validate.flag(rehydrate, op, "rehydrate")
        return rehydrate, self.binding.incarnation

    @translating(lambda session: session.router.app.conf.broker_url)
    def _rehydrated_send(self, node: str, incarnation: str | None, op: str, kwargs: dict[str, Any]) -> Sent:
        """The strict worker is gone: rebuild the session on a live one, then send the call there."""
        self.router.rehydrate(self.binding, node, incarnation)
        return self.router.send(self.binding, op, kwargs)

    @translating(lambda session: session.router.app.conf.broker_url)
    def _send_now(self, op: str, kwargs: dict[str, Any],
                  rehydrate: bool | None) -> tuple[Sent | Callable[[], Sent], bool]:
        """Send on the caller's thread, or, when the strict worker is gone and ``rehydrate`` holds, return the
        rebuild-then-send as a callable to run off the event loop; with the call's rehydrate flag."""
        rehydrate, incarnation = self._checked(op, kwargs, rehydrate)
        try:
            return self.router.send(self.binding, op, kwargs), rehydrate
        except SessionWorkerUnavailable as exc:
            if not rehydrate:
                raise
            return partial(self._rehydrated_send, exc.node, incarnation, op, kwargs), rehydrate

    def call(self, op: str, /, *, timeout: float | None = None, timeout_s: float | None = None,
             rehydrate: bool | None = None, **kwargs: Any) -> Any:
        """Run ``op(**kwargs)`` on the session's worker and return its JSON result (``timeout_s``: alias)."""
        wait_s = validate.timeout(timeout_s if timeout is None else timeout, str(op))
        return self.submit(op, rehydrate=rehydrate, **kwargs).result(wait_s)

    async def acall(self, op: str, /, *, rehydrate: bool | None = None, **kwargs: Any) -> Any:
        """``await session.acall(op, **kwargs)``: the call's result, without a thread per pending call.

        The call is sent before the first ``await`` (one push to the broker, as
        ``submit`` does), so calls made one after another, or many at once in one
        ``asyncio.gather``, run on the worker in the order they were made. Only a
        rehydration, when one is due, runs in the loop's default executor; the
        wait is a callback from the result listener.
        """
        sent, rehydrate = self._send_now(op, kwargs, rehydrate)
        if not isinstance(sent, Sent):  # a rebuild is due: replaying recipes waits, never on the loop
            sent = await asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, sent)
        return await CallFuture(self.router, self.binding, op, kwargs, sent, rehydrate)

    async def amap(self, op: str, kwargs_list: Iterable[dict[str, Any]], *, return_exceptions: bool = False,
                   chunk_size: int | None = None, num_threads: int = 1) -> list[Any]:
        """``map`` for asyncio: every chunk is sent before the first ``await`` (in order), then awaited on the loop."""
        return_exceptions = validate.flag(return_exceptions, "map", "return_exceptions")
        parts = self._chunks(op, kwargs_list, chunk_size, num_threads)
        futures = [self.submit("map", op=op, items=items, num_threads=num_threads) for items in parts]
        replies = await asyncio.gather(*futures, return_exceptions=False)
        return batching.decode(replies, return_exceptions)

    def map(self, op: str, kwargs_list: Iterable[dict[str, Any]], *, return_exceptions: bool = False,
            chunk_size: int | None = None, num_threads: int = 1, timeout_s: float | None = None) -> list[Any]:
        """Run ``op(**kwargs)`` for every item of ``kwargs_list`` on the session's worker; results in order.

        Items travel ``chunk_size`` to a message (default 500) and run in order,
        one chunk after another like any calls of the session (``num_threads`` > 1
        runs a chunk's items concurrently). A failing item raises its typed error
        once every item ran, or stands in its place with ``return_exceptions=True``.
        """
        return_exceptions = validate.flag(return_exceptions, "map", "return_exceptions")
        timeout_s = validate.timeout(timeout_s, "map", "timeout_s")
        parts = self._chunks(op, kwargs_list, chunk_size, num_threads)
        futures = [self.submit("map", op=op, items=items, num_threads=num_threads) for items in parts]
        return batching.collect(futures, timeout_s, return_exceptions)

    def _chunks(self, op: str, kwargs_list: Iterable[dict[str, Any]], chunk_size: int | None,
                num_threads: int) -> list[list[dict[str, Any]]]:
        """A map's items in message-sized chunks, every one's size checked before the first chunk is sent."""
        items = validate.item_list(kwargs_list, "map")
        arguments.call_arguments("map", {"op": op, "items": [], "num_threads": num_threads}, self.limits)
        for kwargs in items:  # sizes only: anything else about an item is its own typed error when it runs
            arguments.item_sizes(op, kwargs, self.limits)
        return batching.chunks(op, items, chunk_size)

    @translating(lambda session: session.router.app.conf.broker_url)
    def close(self) -> None:
        """Delete the session record and free its objects on the worker."""
        if not self.closed:
            self.closed = True
            self.router.close(self.binding)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
