"""``map``: many calls of one operation in one message, run in order (or on a few threads), results in order.

Used by ``session.map`` and ``ModuleRef.batch`` on the producer. Each item is
checked and run like a call of its own; a failing item becomes an error entry
in place and the others still run. ``num_threads`` > 1 runs the items of a
``call`` (module) batch concurrently, as ``dspy.Module.batch`` does; results keep
their order either way.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from routing.errors import FlagshipError, InvalidArgument, OperationFailed, error_to_json
from tasks.worker.allowlist import CallContext, check_number, dispatch, operation

log = logging.getLogger(__name__)

#: Most items one ``map`` message may carry.
max_items = 10_000
#: Most threads one ``map`` call may use on the worker.
max_threads = 64
#: Operations that may not be mapped (they act on the session as a whole).
UNMAPPABLE = frozenset({"map", "release_session"})


def _run_item(ctx: CallContext, op: str, kwargs: Any) -> dict[str, Any]:
    try:
        return {"ok": dispatch(ctx, op, kwargs)}
    except FlagshipError as exc:
        return {"error": error_to_json(exc)}
    except Exception as exc:  # an item's failure never loses the others
        log.exception("item of a %r batch of session %s failed", op, ctx.session_id)
        return {"error": error_to_json(OperationFailed(op, type(exc).__name__, str(exc)))}


@operation("map")
def map_items(ctx: CallContext, op: str, items: list[Any], num_threads: int = 1) -> list[dict[str, Any]]:
    """``[{"ok": result} | {"error": {"type", "args"}}, ...]``, one entry per item, in order."""
    if not isinstance(op, str) or op in UNMAPPABLE:
        raise InvalidArgument("map", f"op must name an operation other than {sorted(UNMAPPABLE)}")
    if not isinstance(items, list) or len(items) > max_items:
        raise InvalidArgument("map", f"items must be a list of at most {max_items} argument objects")
    check_number("map", "num_threads", num_threads, 1, max_threads, integer=True, optional=False)
    if num_threads == 1 or len(items) < 2:
        return [_run_item(ctx, op, kwargs) for kwargs in items]
    with ThreadPoolExecutor(min(num_threads, len(items)), thread_name_prefix="flagship-map") as pool:
        return list(pool.map(lambda kwargs: _run_item(ctx, op, kwargs), items))
