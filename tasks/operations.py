"""The allow-list of operations a producer may call; nothing else runs on a worker.

Each operation is a plain function ``op(ctx, **kwargs) -> JSON``; arguments are
checked against its signature before it runs.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routing.errors import InvalidArgument, UnknownOperation
from tasks.worker_state import WorkerState

Operation = Callable[..., Any]

_OPERATIONS: dict[str, Operation] = {}
_SIGNATURES: dict[str, inspect.Signature] = {}
#: Operations that run even when the session record is already gone.
SESSIONLESS = {"release_session"}


@dataclass(frozen=True)
class CallContext:
    session_id: str
    worker: WorkerState

    @property
    def node(self) -> str:
        return self.worker.node


def operation(name: str) -> Callable[[Operation], Operation]:
    def register(fn: Operation) -> Operation:
        _OPERATIONS[name] = fn
        _SIGNATURES[name] = inspect.signature(fn)
        return fn

    return register


def known_operations() -> list[str]:
    return sorted(_OPERATIONS)


def dispatch(ctx: CallContext, op: str, kwargs: dict[str, Any]) -> Any:
    fn = _OPERATIONS.get(op) if isinstance(op, str) else None
    if fn is None:
        raise UnknownOperation(op, known_operations())
    if not isinstance(kwargs, dict):
        raise InvalidArgument(op, "arguments must be a JSON object of keyword arguments")
    try:
        _SIGNATURES[op].bind(ctx, **kwargs)
    except TypeError as exc:
        raise InvalidArgument(op, str(exc)) from None
    return fn(ctx, **kwargs)


@operation("ping")
def ping(ctx: CallContext, sleep_s: float = 0.0) -> dict[str, Any]:
    """Where the call ran and the how-manyth ping of the session it was on this worker.

    ``sleep_s`` holds the worker busy (for tests and benchmarks); ``started`` and
    ``ended`` are the worker's monotonic clock.
    """
    if not isinstance(sleep_s, (int, float)) or isinstance(sleep_s, bool) or not 0 <= sleep_s <= 60:
        raise InvalidArgument("ping", "sleep_s must be a number between 0 and 60")
    started = time.monotonic()
    seq = ctx.worker.next_seq(ctx.session_id)
    if sleep_s:
        time.sleep(sleep_s)
    return {"node": ctx.node, "pid": os.getpid(), "session_id": ctx.session_id, "seq": seq,
            "started": started, "ended": time.monotonic()}


@operation("release_session")
def release_session(ctx: CallContext) -> dict[str, Any]:
    """Free everything the session holds on this worker (sent when a session closes)."""
    return {"released": ctx.worker.forget_session(ctx.session_id)}
