"""The Celery app. Workers: ``flagship worker --pool NAME`` or ``celery -A tasks.app worker``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task, states

from routing import names
from routing.broker.celery_config import celery_config
from routing.broker.embedded import resolve_url
from routing.errors import FlagshipError
from routing.settings import Settings


def _config() -> dict[str, Any]:
    settings = Settings.from_env()
    return celery_config(settings, resolve_url(settings))


app = Celery("flagship")
# Evaluated lazily, when Celery first reads its configuration (not at import).
app.add_defaults(_config)

from tasks.ops import (  # noqa: E402, F401  (the operation allow-list)
    analytics,
    batch,
    context,
    evaluation,
    modules,
    programs,
    record,
    refs,
    rlm,
    session,
)
from tasks.tracing.run import run_span  # noqa: E402  (worker set-up and flush from the OTEL_* environment)
from tasks.worker import hooks, redelivery  # noqa: E402  (Celery signals; effectively once for completed work)
from tasks.worker.calls import after_call, execute_call  # noqa: E402
from tasks.worker.turns import delivery_tag_of  # noqa: E402


class CallTask(Task):  # type: ignore[misc]
    """``flagship.call``: after its result is stored, its claims go and a hint session is rebound (``after_call``)."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(args, (list, tuple)) and len(args) == 4:
            after_call(hooks.current_worker(), args[0], args[3], status == states.SUCCESS)


@app.task(name=names.CALL_TASK, bind=True, base=CallTask, throws=(FlagshipError,))
def run_call(self: Any, session_id: str, op: str, kwargs: dict[str, Any], route: dict[str, Any]) -> dict[str, Any]:
    """One call of a session: the allow-listed operation ``op(**kwargs)``, on the worker holding its state."""
    worker = hooks.current_worker()
    with run_span(self.request, worker.node, session_id, op, kwargs, route):  # OpenTelemetry; nothing when off
        # A call that comes again after it completed does not run (a copy of one held here is checked too).
        redelivery.answer_from_store(self, worker.redis, route,
                                     copy=worker.turns.is_copy(delivery_tag_of(self.request)))
        return execute_call(worker, self.request.id, session_id, op, kwargs, route)


@app.task(name=names.NOOP_TASK)
def noop(payload: Any = None) -> dict[str, Any]:
    """Plain Celery baseline for benchmarks: same reply as ``ping``, no routing; ``payload`` is ignored."""
    return {"node": hooks.current_node(), "pid": os.getpid()}
