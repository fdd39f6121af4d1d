"""Running one call of a session on this worker: turn-taking, checks, dispatch."""

from __future__ import annotations

import logging
from typing import Any

from routing.errors import FlagshipError, OperationFailed, SessionWorkerUnavailable
from routing.pools import Affinity
from tasks.operations import SESSIONLESS, CallContext, dispatch
from tasks.worker_state import WorkerState

log = logging.getLogger(__name__)


def execute_call(
    worker: WorkerState, call_id: str, session_id: str, op: str, kwargs: dict[str, Any], route: dict[str, Any]
) -> dict[str, Any]:
    """Run ``op`` for ``session_id`` once its earlier calls on this worker are done.

    Returns ``{"node": ..., "value": ...}`` so the producer learns who ran it.
    """
    target = route.get("node")
    affinity = Affinity(route.get("affinity", Affinity.STRICT_QUEUE.value))
    with worker.turns.turn(session_id, call_id):
        if target and target != worker.node and affinity.strict:
            # A strict call moved here from a dead worker's queue: its state is not here.
            raise SessionWorkerUnavailable(session_id, target)
        if op not in SESSIONLESS:
            worker.ensure_session(session_id, float(route.get("ttl_s") or worker.settings.session_ttl_s))
        try:
            value = dispatch(CallContext(session_id, worker), op, kwargs)
        except FlagshipError:
            raise
        except Exception as exc:
            log.exception("operation %r of session %s failed", op, session_id)
            raise OperationFailed(op, type(exc).__name__, str(exc)) from None
    if affinity is Affinity.HINT and target != worker.node:
        worker.sessions.rebind(session_id, worker.node)
    return {"node": worker.node, "value": value}
