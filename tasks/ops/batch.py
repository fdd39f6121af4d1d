"""``map``: many calls of one operation in one message, run in order (or on a few threads), results in order.

Used by ``session.map`` and ``ModuleRef.batch`` on the producer. Each item is
checked and run like a call of its own; a failing item becomes an error entry
in place and the others still run. ``num_threads`` > 1 runs the items of a
``call`` (module) batch concurrently, as ``dspy.Module.batch`` does; results keep
their order either way.

Concurrent items run on one thread pool per worker process, kept between
batches: starting 64 threads for every chunk of an LM map cost ~1.5 ms each
under load (the GIL hand-off of ``Thread.start``), so a chunk's last item
started ~100 ms after its first.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from routing.errors import FlagshipError, OperationFailed, error_to_json
from routing.validate import max_threads
from tasks.worker.allowlist import CallContext, dispatch, operation

log = logging.getLogger(__name__)

#: Threads the shared item pool may grow to; a thread is started only when no idle one is free. When
#: every one is busy (many maps at once), a map's items run on the runners it got, its own thread included.
ITEM_THREADS = 16 * max_threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _item_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(ITEM_THREADS, thread_name_prefix="flagship-map")
    return _pool


def _run_item(ctx: CallContext, op: str, kwargs: Any) -> dict[str, Any]:
    try:
        return {"ok": dispatch(ctx, op, kwargs)}
    except FlagshipError as exc:
        return {"error": error_to_json(exc)}
    except Exception as exc:  # an item's failure never loses the others
        log.exception("item of a %r batch of session %s failed", op, ctx.session_id)
        return {"error": error_to_json(OperationFailed(op, type(exc).__name__, str(exc)))}


def _run_concurrently(ctx: CallContext, op: str, items: list[Any], num_threads: int) -> list[dict[str, Any]]:
    """Items on ``num_threads`` runners of the shared pool, each taking the next item as it frees up."""
    replies: list[dict[str, Any]] = [{}] * len(items)
    indexes = iter(range(len(items)))
    lock = threading.Lock()

    def runner() -> None:
        while True:
            with lock:
                i = next(indexes, None)
            if i is None:
                return
            replies[i] = _run_item(ctx, op, items[i])

    pool = _item_pool()
    # each runner in a copy of this call's context: its items' LM requests keep the call's scope (session, budget)
    runners = [pool.submit(contextvars.copy_context().run, runner) for _ in range(min(num_threads, len(items)) - 1)]
    runner()  # the task's own thread is one of the runners
    for done in runners:
        if not done.cancel():  # one still waiting for a free thread has nothing left to do
            done.result()
    return replies


@operation("map")
def map_items(ctx: CallContext, op: str, items: list[Any], num_threads: int = 1) -> list[dict[str, Any]]:
    """``[{"ok": result} | {"error": {"type", "args"}}, ...]``, one entry per item, in order.

    ``op``, ``items`` (at most ``routing.validate.max_items``) and ``num_threads`` were
    checked by the allow-list (``routing.validate.ARGUMENTS``); each item is checked as it runs.
    """
    if num_threads == 1 or len(items) < 2:
        return [_run_item(ctx, op, kwargs) for kwargs in items]
    return _run_concurrently(ctx, op, items, num_threads)
