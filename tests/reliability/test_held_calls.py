"""Calls a worker holds for their session's turn: no thread each, counted by ``max_queued``, visible.

One 64-thread ``held_pool`` worker for the module. A session's calls behind a long one are taken
from the worker's queue into its memory (parked, ``tasks.worker.turns``): they must not block
other sessions, must count toward ``PoolSaturated``, and must show in status and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import wait_until
from test_metrics import running_metrics

from routing import Client, Session, names
from routing.errors import PoolSaturated
from routing.producer.future import gather
from tasks.local.stack import Stack, WorkerProcess

POOL = "held_pool"


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    started = stack.start_worker(POOL, wait=False)
    stack.wait_ready([started])
    yield started
    started.stop()


def _reported_held(client: Client, node: str) -> int:
    return int(client.redis.hget(names.worker_key(node), "held") or 0)


def _settled(client: Client, node: str) -> None:
    wait_until(lambda: _reported_held(client, node) == 0 and client.redis.llen(names.worker_queue(node)) == 0,
               timeout_s=60, what="nothing left held or queued")


def test_a_fourth_sessions_call_runs_at_once_behind_three_sessions_holding_40_calls_each(
    client: Client, sessions: Callable[..., Session], worker: WorkerProcess,
) -> None:
    busy = [sessions(POOL, node=worker.node) for _ in range(3)]
    long_s = 6.0
    longs = [s.submit("ping", sleep_s=long_s) for s in busy]
    behind = [s.submit("ping") for s in busy for _ in range(40)]
    wait_until(lambda: _reported_held(client, worker.node) == 120, timeout_s=20, what="120 calls held")
    started = time.monotonic()
    assert sessions(POOL, node=worker.node).call("ping", timeout_s=long_s)["node"] == worker.node
    assert time.monotonic() - started < long_s / 2  # at once, not after the long calls (61 threads would wait)
    assert not any(f.done() for f in longs)
    replies = gather([*longs, *behind], timeout_s=60)
    for i in range(3):  # each session's calls ran one at a time, in order
        assert [r["seq"] for r in [replies[i], *replies[3 + 40 * i: 3 + 40 * (i + 1)]]] == list(range(1, 42))
    _settled(client, worker.node)


def test_calls_held_in_memory_count_toward_max_queued(
    client: Client, sessions: Callable[..., Session], worker: WorkerProcess,
) -> None:
    limit = client.pools.get(POOL).max_queued
    assert limit == 1000
    session = sessions(POOL, node=worker.node)
    long = session.submit("ping", sleep_s=6.0)
    wait_until(lambda: client.redis.llen(names.worker_queue(worker.node)) == 0, what="the long call taken")
    accepted, refused, slowest_refusal = [], 0, 0.0
    for _ in range(limit + 100):
        started = time.monotonic()
        try:
            accepted.append(session.submit("ping"))
        except PoolSaturated:
            refused += 1
            slowest_refusal = max(slowest_refusal, time.monotonic() - started)
    held, queued = _reported_held(client, worker.node), client.redis.llen(names.worker_queue(worker.node))
    # Whatever the split between Redis and the worker's memory; the bound is soft by the one message a worker's
    # BRPOP may have taken and not yet recorded (the drain script records it and sets ``held`` next).
    assert refused >= 100 - 1, (refused, held, queued)
    assert slowest_refusal < 1.0
    assert held > 0  # the worker did take calls into memory
    gather([long, *accepted], timeout_s=120)
    _settled(client, worker.node)


def test_a_backlog_held_by_the_worker_shows_in_status_and_metrics(
    stack: Stack, client: Client, sessions: Callable[..., Session], worker: WorkerProcess,
) -> None:
    pair = [sessions(POOL, node=worker.node) for _ in range(2)]
    longs = [s.submit("ping", sleep_s=5.0) for s in pair]
    behind = [s.submit("ping") for s in pair for _ in range(9)]
    wait_until(lambda: _reported_held(client, worker.node) == 18, timeout_s=20, what="18 calls held")
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "status", "--json"],
                          env={**os.environ, "REDIS_URL": stack.redis_url}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    pool = next(p for p in data["pools"] if p["name"] == POOL)
    info = next(w for w in data["workers"] if w["node"] == worker.node)
    assert abs(pool["waiting"] - 18) <= 2 and abs(info["held"] + info["queued"] - 18) <= 2
    assert stack.log_dir is not None
    with running_metrics(stack, stack.log_dir) as metrics:  # `flagship metrics`, as tests/test_metrics.py runs it
        waiting = metrics.value("flagship_calls_waiting", pool=POOL)
        held = metrics.value("flagship_calls_waiting", pool=POOL, worker=worker.node, where="held")
    assert waiting is not None and abs(waiting - 18) <= 2 and held is not None and abs(held - 18) <= 2
    gather([*longs, *behind], timeout_s=60)
    _settled(client, worker.node)
