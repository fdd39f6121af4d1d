"""Operations on the session itself: ``ping`` (where and in which order calls run) and ``release_session``."""

from __future__ import annotations

import os
import time
from typing import Any

from tasks.worker.allowlist import CallContext, operation


@operation("ping")
def ping(ctx: CallContext, sleep_s: float = 0.0) -> dict[str, Any]:
    """Where the call ran and the how-manyth ping of the session it was on this worker.

    ``sleep_s`` (0-60, checked by the allow-list) holds the worker busy (for tests and benchmarks); ``started`` and
    ``ended`` are the worker's monotonic clock.
    """
    started = time.monotonic()
    seq = ctx.worker.book.next_seq(ctx.session_id)
    if sleep_s:
        time.sleep(sleep_s)
    return {"node": ctx.node, "pid": os.getpid(), "session_id": ctx.session_id, "seq": seq,
            "started": started, "ended": time.monotonic()}


@operation("release_session")
def release_session(ctx: CallContext) -> dict[str, Any]:
    """Free everything the session holds on this worker (sent when a session closes)."""
    return {"released": ctx.worker.forget_session(ctx.session_id)}
