"""A producer's handle on one session: call operations on the worker that holds its state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routing.errors import SessionClosed
from routing.future import CallFuture
from routing.pools import Affinity

if TYPE_CHECKING:
    from routing.client import Client


class Session:
    def __init__(self, client: Client, session_id: str, pool: str, affinity: Affinity,
                 worker: str | None, ttl_s: float) -> None:
        self.client = client
        self.id = session_id
        self.pool = pool
        self.affinity = affinity
        #: Node name of the bound worker (None until a lazy session's first call).
        self.worker = worker
        self.ttl_s = ttl_s
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.id} pool={self.pool} affinity={self.affinity.value} worker={self.worker}>"

    def submit(self, op: str, /, **kwargs: Any) -> CallFuture:
        """Send ``op(**kwargs)`` to the session's worker; returns at once."""
        if self.closed:
            raise SessionClosed(self.id)
        return self.client._send(self, op, kwargs)

    def call(self, op: str, /, *, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run ``op(**kwargs)`` on the session's worker and return its JSON result."""
        return self.submit(op, **kwargs).result(timeout_s)

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

    def _ran_on(self, node: str | None) -> None:
        if node and node != self.worker and self.affinity is Affinity.HINT:
            self.worker = node
            self.client.watch.watch(node)
