"""Claims (big arguments stored beside a call) are deleted only after the call's result is stored.

Before, a call deleted its claims and then stored its result: a kill -9 in between turned completed
work into ``InvalidArgument`` on redelivery. The worker here kills itself right after the store
(``kill_points``): the claims must still exist then, and the caller must have its result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from custom_workers import spawn_worker
from helpers import wait_until
from kill_points import NOTES_KEY

from routing import Client, Session
from tasks.local.stack import Stack

POOL = "kill_pool"


def test_a_kill_after_the_result_store_finds_the_claims_still_there_and_the_caller_has_its_result(
    stack: Stack, client: Client, sessions: Callable[..., Session],
) -> None:
    worker = spawn_worker(stack, POOL, f"claims-{uuid.uuid4().hex[:6]}", celery_args=("--include", "kill_points"),
                          env={"FLAGSHIP_TEST_KILL_AFTER_STORE": "1"})
    try:
        stack.wait_ready([worker])
        session = sessions(POOL, node=worker.node)
        data = "x" * (client.settings.claim_threshold_bytes + 1)  # travels as a claim
        future = session.submit("payload_size", data=data)
        assert future.result(30)["size"] == len(data)  # stored (and published) before the kill
        wait_until(lambda: worker.proc.poll() is not None, timeout_s=30, what="the worker killed itself")
        notes = [json.loads(n) for n in client.redis.lrange(NOTES_KEY, 0, -1)]
        assert {"task_id": future.id, "claims_exist": [1]} in notes
        stored = json.loads(client.redis.get(client.app.backend.get_key_for_task(future.id)))
        assert stored["status"] == "SUCCESS"
    finally:
        worker.stop()
