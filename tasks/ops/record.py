"""``record``: an operation that leaves a trace of every execution, for chaos tests and ``flagship bench chaos``."""

from __future__ import annotations

import json
import time
from typing import Any

from celery import current_task

from routing import names
from routing.errors import InvalidArgument
from tasks.worker.allowlist import CallContext, operation

#: Executions kept (the newest), so a long benchmark cannot fill the server.
max_recorded = 1_000_000


@operation("record")
def record(ctx: CallContext, marker: str, sleep_s: float = 0.0) -> dict[str, Any]:
    """Append this execution (the call's task id and ``marker``) to ``names.EXECUTIONS_KEY``, then sleep.

    Every execution of a call is counted, duplicates included, and the record
    survives the worker's death (it is written before the sleep, at the start).
    """
    if not isinstance(marker, str) or not 0 < len(marker) <= 200:
        raise InvalidArgument("record", "marker must be a string of 1 to 200 characters")
    if isinstance(sleep_s, bool) or not isinstance(sleep_s, (int, float)) or not 0 <= sleep_s <= 60:
        raise InvalidArgument("record", "sleep_s must be a number between 0 and 60")
    task = current_task
    entry = json.dumps({"task_id": task.request.id if task else None, "marker": marker, "node": ctx.node})
    pipe = ctx.worker.redis.pipeline(transaction=False)
    pipe.rpush(names.EXECUTIONS_KEY, entry)
    pipe.ltrim(names.EXECUTIONS_KEY, -max_recorded, -1)
    pipe.execute()
    if sleep_s:
        time.sleep(sleep_s)
    return {"node": ctx.node, "marker": marker}
