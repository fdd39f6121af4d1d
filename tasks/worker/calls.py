"""Running one call of a session on this worker: checks, dispatch, and the bookkeeping after its stored result."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery.worker import state as celery_state

from routing.broker import claims
from routing.errors import (
    CallCancelled,
    FlagshipError,
    InvalidArgument,
    OperationFailed,
    QueueTimeout,
    SessionWorkerUnavailable,
)
from routing.pools import Affinity
from tasks.lm.governor import lm_scope
from tasks.worker.allowlist import SESSIONLESS, CallContext, dispatch
from tasks.worker.state import WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where the producer sent a call, and why (the task's ``route`` argument)."""

    node: str | None
    affinity: Affinity
    incarnation: str | None
    ttl_s: float | None
    #: The call must start by this time (seconds since the epoch), else ``QueueTimeout`` (None: no limit).
    deadline: float | None = None
    queue_timeout_s: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> Route:
        if not isinstance(raw, dict):
            raise InvalidArgument("route", "must be an object")
        try:
            affinity = Affinity(raw.get("affinity", Affinity.STRICT_QUEUE.value))
        except ValueError:
            raise InvalidArgument("route", f"unknown affinity {raw.get('affinity')!r}") from None
        return cls(raw.get("node"), affinity, raw.get("incarnation"), _number(raw, "ttl_s") or None,
                   _number(raw, "deadline"), _number(raw, "queue_timeout_s"))


def _number(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument("route", f"{key} must be a number")
    return float(value)


def execute_call(
    worker: WorkerState, call_id: str, session_id: str, op: str, kwargs: dict[str, Any], route: dict[str, Any]
) -> dict[str, Any]:
    """Run ``op`` for ``session_id``; its turn was taken before (``tasks.worker.turns``: the call is started
    only when the session's earlier calls on this worker are done, or at its deadline, to fail here).

    Arguments sent by reference (``routing.broker.claims``) are read here; their keys are deleted once
    the result is stored (:func:`after_call`): a worker killed before that leaves them for the redelivered call.
    Returns ``{"node": ..., "value": ...}`` so the producer learns who ran it.
    """
    where = Route.parse(route)
    stale = where.node != worker.node or where.incarnation not in (None, worker.incarnation)
    if where.affinity.strict and where.node and stale:
        # A strict call moved off a dead worker, or sent to an earlier run of this node: its state is gone.
        raise SessionWorkerUnavailable(session_id, where.node)
    if call_id in celery_state.revoked:
        # Cancelled by its producer while it waited for the session's turn: never run.
        raise CallCancelled(session_id, op)
    if where.deadline is not None and time.time() > where.deadline:
        # Not started by its pool's queue timeout (queued, or held behind the session's calls): never run.
        raise QueueTimeout(session_id, op, where.queue_timeout_s)
    if op not in SESSIONLESS:
        worker.book.ensure(session_id, where.ttl_s or worker.book.default_ttl_s)
    held = claims.held(route)
    if held:
        kwargs = claims.resolve(worker.redis, session_id, op, kwargs, held)
    try:
        with lm_scope(session_id, where.deadline):  # its LM requests: this session's usage and budget
            value = dispatch(CallContext(session_id, worker, call_id), op, kwargs)
    except FlagshipError:
        raise
    except Exception as exc:
        log.exception("operation %r of session %s failed", op, session_id)
        raise OperationFailed(op, type(exc).__name__, str(exc)) from None
    if where.affinity.strict:
        worker.confirm_run()
        if where.incarnation not in (None, worker.incarnation):
            # This run was declared dead while the call ran (stalled, or cut off): its caller was told so.
            raise SessionWorkerUnavailable(session_id, where.node or worker.node)
    return {"node": worker.node, "value": value}


#: Attempts at a hint session's rebind when Redis fails, and the pause between them.
after_call_attempts = 3
after_call_pause_s = 0.2


def after_call(worker: WorkerState, session_id: Any, route: Any, succeeded: bool) -> None:
    """Once the call's result is stored: delete its claims and, for a hint call that ran here, rebind its session.

    Never raises: the call is complete and its result stored. A Redis error is logged (claims expire
    with their TTL); the rebind is retried first (the producer rebinds a hint session from the reply anyway).
    """
    if not isinstance(session_id, str) or not isinstance(route, dict):
        return
    claims.discard(worker.redis, session_id, claims.held(route))
    try:
        where = Route.parse(route)
    except InvalidArgument:
        return
    if not (succeeded and where.affinity is Affinity.HINT and where.node != worker.node):
        return
    for attempt in range(after_call_attempts):
        try:
            worker.sessions.rebind(session_id, worker.node, worker.incarnation)
            return
        except Exception:
            if attempt + 1 == after_call_attempts:
                log.warning("rebinding session %s after its call failed", session_id, exc_info=True)
                return
            time.sleep(after_call_pause_s)
