"""The allow-list of operations a producer may call; nothing else runs on a worker.

Each operation is a plain function ``op(ctx, **kwargs) -> JSON``. Before it runs,
the session id and the arguments are checked by :mod:`routing.validate` and
:mod:`routing.arguments` (types, bounds, sizes: the worker is the authority,
whatever the producer checked) and against the function's signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routing import arguments, validate
from routing.errors import InvalidArgument, UnknownOperation
from tasks.worker.settings import WorkerSettings
from tasks.worker.state import WorkerState

Operation = Callable[..., Any]

_OPERATIONS: dict[str, Operation] = {}
_SIGNATURES: dict[str, inspect.Signature] = {}
#: Operations that run even when the session record is already gone.
SESSIONLESS = {"release_session"}


@dataclass(frozen=True)
class CallContext:
    session_id: str
    worker: WorkerState
    #: The call's task id (a streamed call names its stream by it).
    call_id: str | None = None

    @property
    def node(self) -> str:
        return self.worker.node

    @property
    def settings(self) -> WorkerSettings:
        return self.worker.settings


def operation(name: str) -> Callable[[Operation], Operation]:
    def register(fn: Operation) -> Operation:
        if name in _OPERATIONS and _OPERATIONS[name] is not fn:
            raise RuntimeError(f"operation {name!r} is registered twice ({_OPERATIONS[name].__module__}, "
                               f"{fn.__module__})")
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
    validate.session_id(ctx.session_id, op)
    arguments.call_arguments(op, kwargs, ctx.settings.routing, items=False)  # a map's items: each as it runs
    try:
        _SIGNATURES[op].bind(ctx, **kwargs)
    except TypeError as exc:
        raise InvalidArgument(op, str(exc)) from None
    return fn(ctx, **kwargs)


def check_number(op: str, name: str, value: Any, low: float, high: float, *, integer: bool = False,
                 optional: bool = True) -> None:
    """Refuse a non-number (bools included), a float where an integer is due, or a value outside [low, high]."""
    validate.number(op, name, value, low, high, integer=integer, optional=optional)
