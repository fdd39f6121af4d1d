"""Stock Celery, the routing benchmark's baseline: the issue's "plain Celery with the same durability and
event settings" (JSON, acks late, rejected on worker loss, prefetch 1, task events on, Redis broker and
result backend), and none of flagship's transport, event or worker changes.

Its workers run the stock app: ``REDIS_URL=... celery -A tasks.bench.helpers.plain_celery worker -P threads -c 2
-Q <queue> --without-mingle --without-gossip``, the same pool and flags ``flagship worker`` gives Celery.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from celery import Celery

__all__ = ["NOOP_TASK", "make_app", "worker_command"]

NOOP_TASK = "plain.noop"


def make_app(redis_url: str, visibility_timeout_s: float = 3600) -> Celery:
    app = Celery("plain_celery", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True, task_reject_on_worker_lost=True, task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1, worker_send_task_events=True, result_expires=3600,
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        broker_connection_retry_on_startup=True,
    )

    @app.task(name=NOOP_TASK)
    def noop() -> dict[str, Any]:
        """Returns node and pid, like flagship's ``ping``."""
        return {"node": socket.gethostname(), "pid": os.getpid()}

    return app


def worker_command(python: str, queue: str, name: str, concurrency: int) -> list[str]:
    return [python, "-m", "celery", "-A", "tasks.bench.helpers.plain_celery", "worker", "-P", "threads", "-c",
            str(concurrency), "-Q", queue, "-n", name, "-l", "warning", "--without-mingle", "--without-gossip"]


def _app_from_env() -> Celery:
    from routing.settings import Settings

    settings = Settings.from_env()
    return make_app(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), settings.visibility_timeout_s)


#: The app stock workers load (``celery -A tasks.bench.helpers.plain_celery``).
app = _app_from_env()
