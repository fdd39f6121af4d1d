"""Test-only operations, loaded into a test worker with ``celery worker --include liveness_ops``.

``hold_gil`` keeps a worker thread inside the regex engine, which holds the GIL for
the whole match: an exponential backtrack (``(a+)+$`` against ``a...ab``), each
match grown until it takes about ``chunk_s``. Between matches the other threads
get the GIL back only for a moment, so a heartbeat thread is starved the way a
10 MB input through JSON or regex starves it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from tasks.worker.allowlist import CallContext, operation

_BACKTRACK = re.compile(r"(a+)+$")


@operation("hold_gil")
def hold_gil(ctx: CallContext, seconds: float, chunk_s: float = 0.5) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + seconds
    size, matches, longest = 18, 0, 0.0
    while time.monotonic() < deadline:
        t = time.monotonic()
        _BACKTRACK.match("a" * size + "b")
        took = time.monotonic() - t
        longest = max(longest, took)
        matches += 1
        if took < chunk_s and size < 30:
            size += 1
    return {"node": ctx.node, "pid": os.getpid(), "matches": matches, "longest_s": round(longest, 3),
            "held_s": round(time.monotonic() - started, 3)}
