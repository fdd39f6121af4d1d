"""The values the router works on: a session's binding, a dispatched call, a pending call."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from routing.fleet import task_view
from routing.fleet.registry import Liveness
from routing.pools import Affinity


@dataclass
class Binding:
    """A session as its router sees it; ``worker``/``incarnation`` change only under ``lock``."""

    session_id: str
    pool: str
    affinity: Affinity
    ttl_s: float
    #: Node name of the bound worker (None until a lazy session's first call).
    worker: str | None = None
    #: The run of that node holding the session's state (a restart under the same name loses it).
    incarnation: str | None = None
    #: How many times the session was rebuilt on a new worker through this binding.
    rehydrations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def holds_state_on(self, view: Liveness) -> bool:
        """Whether the worker described by ``view`` can take this session's calls (strict sessions)."""
        return view.accepting and view.same_run(self.incarnation)


@dataclass(frozen=True)
class Sent:
    """One dispatched call: its task id, the worker run it was sent to (None: the shared queue), its reply."""

    task_id: str
    target: str | None
    incarnation: str | None
    #: Settled by the result listener with the reply envelope ``{"node", "value"}`` (or the call's error).
    reply: Future[Any]


@dataclass(frozen=True)
class Waiting:
    """What the result listener keeps about a pending call, to fail it if its strict worker dies."""

    session_id: str
    strict: bool
    target: str | None
    incarnation: str | None
    #: The call's pool and task arguments: what a resend needs (``routing.producer.recovery.sweep``).
    #: Kept for hint calls, and for strict calls too with Sentinel (a failover may lose any call;
    #: see ``Router.keep_strict_args``).
    pool: str | None = None
    args: list[Any] | None = None
    #: The call's trace context headers (``routing.tracing``): a resent copy carries them too.
    trace: dict[str, str] | None = None


def redacted_argsrepr(args: list[Any]) -> str:
    """The short repr Celery shows for a call: session, pool, ref, arguments; secrets masked."""
    return task_view.call_argsrepr(args)
