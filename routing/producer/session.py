"""A producer's handle on one session: call operations on the worker that holds its state."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from routing.errors import SessionClosed, SessionWorkerUnavailable
from routing.pools import Affinity
from routing.producer.future import CallFuture
from routing.producer.handles import RefMethods
from routing.registry import Liveness

if TYPE_CHECKING:
    from routing.producer.client import Client


class Session(RefMethods):
    """A producer's handle on a session: its calls go to the worker holding its state.

    Made by :meth:`Client.session` (open) or :meth:`Client.attach` (existing).
    ``call``/``submit`` run allow-listed operations with JSON arguments; the
    DSPy-facing helpers (``lm``, ``predict``, ``rlm``, ``history``, ...) come from
    :class:`~routing.producer.handles.RefMethods`. Safe to share between threads for
    submitting; wait on futures from one thread.
    """

    def __init__(self, client: Client, session_id: str, pool: str, affinity: Affinity,
                 worker: str | None, ttl_s: float, rehydrate: bool = False) -> None:
        self.client = client
        self.id = session_id
        self.pool = pool
        self.affinity = affinity
        #: Node name of the bound worker (None until a lazy session's first call).
        self.worker = worker
        #: The run of that node holding the session's state (a restart under the same name loses it).
        self.incarnation: str | None = None
        self.ttl_s = ttl_s
        self.closed = False
        #: Rebuild the session on a live worker when its strict worker is gone (see ``rehydrate``).
        self.rehydrate = rehydrate
        #: How many times this handle rebuilt the session on a new worker.
        self.rehydrations = 0
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Session {self.id} pool={self.pool} affinity={self.affinity.value} worker={self.worker}>"

    def submit(self, op: str, /, *, rehydrate: bool | None = None, **kwargs: Any) -> CallFuture:
        """Send ``op(**kwargs)`` to the session's worker; returns at once.

        ``rehydrate`` (default: the session's setting): if the strict worker is
        gone, rebind to a live worker, rebuild the session's refs from their
        recipes, then run the call there. Without it the error is
        ``SessionWorkerUnavailable``.
        """
        if self.closed:
            raise SessionClosed(self.id)
        rehydrate = self.rehydrate if rehydrate is None else rehydrate
        incarnation = self.incarnation
        try:
            return self.client._send(self, op, kwargs, rehydrate)
        except SessionWorkerUnavailable as exc:
            if not rehydrate:
                raise
            self.client._rehydrate(self, exc.node, incarnation)
            return self.client._send(self, op, kwargs, rehydrate)

    def call(self, op: str, /, *, timeout_s: float | None = None, rehydrate: bool | None = None,
             **kwargs: Any) -> Any:
        """Run ``op(**kwargs)`` on the session's worker and return its JSON result."""
        return self.submit(op, rehydrate=rehydrate, **kwargs).result(timeout_s)

    def ping(self, sleep_s: float = 0.0, timeout_s: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.call("ping", sleep_s=sleep_s, timeout_s=timeout_s)
        return result

    def close(self) -> None:
        """Delete the session record and free its objects on the worker."""
        if not self.closed:
            self.closed = True
            self.client._close(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def holds_state_on(self, view: Liveness) -> bool:
        """Whether the worker described by ``view`` can take this session's calls (strict sessions)."""
        return view.accepting and view.same_run(self.incarnation)

    def _ran_on(self, node: str | None) -> None:
        if node and node != self.worker and self.affinity is Affinity.HINT:
            self.worker = node
            self.client.watch.watch(node)
