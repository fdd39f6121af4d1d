"""Test-only: loaded into a worker with ``celery worker --include kill_points``.

With ``FLAGSHIP_TEST_KILL_AFTER_STORE=1``, the worker notes whether a ``payload_size`` call's claims
(its big arguments, ``routing.broker.claims``) still exist once the call's result is stored, then
kills itself with SIGKILL: the moment between the result store and the claim delete.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from celery import signals

from routing import names
from tasks.worker import hooks

#: Where the worker notes, per call, whether each claim existed when the result was stored.
NOTES_KEY = "flagship:test:claims-at-store"


@signals.task_success.connect
def _kill_after_store(sender: Any, **_: Any) -> None:  # Celery sends it after the result is stored
    args = sender.request.args or []
    if not os.environ.get("FLAGSHIP_TEST_KILL_AFTER_STORE") or len(args) != 4 or args[1] != "payload_size":
        return
    claims = args[3].get("claims") if isinstance(args[3], dict) else None
    if not claims:
        return
    redis = hooks.current_worker().redis
    exists = [int(redis.exists(names.claim_key(args[0], claim))) for claim in claims.values()]
    redis.rpush(NOTES_KEY, json.dumps({"task_id": sender.request.id, "claims_exist": exists}))
    os.kill(os.getpid(), signal.SIGKILL)
