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

from routing.errors import FlagshipError, OperationFailed, error_to_json
from tasks.worker.allowlist import CallContext, dispatch, operation

log = logging.getLogger(__name__)



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
    """``[{"ok": result} | {"error": {"type", "args"}}, ...]``, one entry per item, in order.

    ``op``, ``items`` (at most ``routing.validate.max_items``) and ``num_threads`` were
    checked by the allow-list (``routing.validate.ARGUMENTS``); each item is checked as it runs.
    """
    if num_threads == 1 or len(items) < 2:
        return [_run_item(ctx, op, kwargs) for kwargs in items]
    with ThreadPoolExecutor(min(num_threads, len(items)), thread_name_prefix="flagship-map") as pool:
        return list(pool.map(lambda kwargs: _run_item(ctx, op, kwargs), items))
