"""`flagship status`: pools, live workers, sessions and queue depths, as JSON and as tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from routing import Session
from tasks.local.stack import Stack


def status(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": stack.redis_url}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "status", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_status_json_lists_pools_workers_sessions_and_queue_depths(
    stack: Stack, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    session.predict("ticket -> category")
    done = status(stack, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    pools = {p["name"]: p for p in data["pools"]}
    assert pools["triage_pool"]["live_workers"] >= 2 and pools["triage_pool"]["affinity"] == "strict_queue"
    assert pools["rlm_pool"]["requires"] == ["deno"] and "queued" in pools["analytics_pool"]
    workers = {w["node"]: w for w in data["workers"]}
    for worker in stack.workers:
        if worker.alive() and worker.pool == "triage_pool":
            info = workers[worker.node]
            assert info["live"] and info["pid"] == worker.pid and info["heartbeat_age_s"] < 5
            assert {"in_flight", "concurrency", "sessions", "refs", "queued", "capabilities"} <= info.keys()
    assert workers[session.worker]["sessions"] >= 1 and workers[session.worker]["refs"] >= 0
    record = next(s for s in data["sessions"] if s["id"] == session.id)
    assert record["worker"] == session.worker and record["pool"] == "triage_pool"


def test_status_tables_render(stack: Stack) -> None:
    done = status(stack)
    assert done.returncode == 0, done.stderr
    assert "triage_pool" in done.stdout and "sessions" in done.stdout
