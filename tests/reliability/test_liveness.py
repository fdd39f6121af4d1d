"""Liveness that CPU work cannot fake: the pulse process, kill -9, hung workers, and a heartbeat that never dies.

Workers here run ``liveness_pool`` (one per test, started with the test-only
``hold_gil`` operation); the heartbeat TTL is 2 s (``TEST_ENV``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from custom_workers import children_of, pid_alive, spawn_worker
from helpers import wait_until
from redis import Redis

from routing import Client, Session, names
from routing.errors import SessionWorkerUnavailable
from routing.fleet import heartbeat
from routing.fleet.heartbeat import Heartbeat
from routing.fleet.pulse import Pulse
from routing.fleet.reaper import reap_dead_workers
from routing.fleet.registry import Registry, WorkerInfo
from routing.fleet.sessions import SessionStore
from routing.settings import Settings
from tasks.local.stack import Stack, WorkerProcess

POOL = "liveness_pool"


@pytest.fixture
def ttl_s(stack: Stack) -> float:
    return Settings.from_env().heartbeat_ttl_s


@pytest.fixture
def liveness_worker(stack: Stack, sessions: Callable[..., Session]) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a ``liveness_pool`` worker (with ``hold_gil``); stopped after the test (sessions close first)."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None) -> WorkerProcess:
        worker = spawn_worker(stack, POOL, f"live-{uuid.uuid4().hex[:6]}", env=env,
                              celery_args=("--include", "liveness_ops"))
        started.append(worker)
        stack.wait_ready([worker])
        return worker

    yield start
    for worker in started:
        worker.proc.send_signal(signal.SIGCONT)
        worker.stop()


def pulse_of(worker: WorkerProcess) -> int:
    """The pid of the worker's pulse process (started just after the worker registers, so waited for)."""

    def pulses() -> list[int]:
        found = []
        for pid in children_of(worker.pid):
            try:
                if b"pulse.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:  # exited meanwhile
                continue
        return found

    wait_until(lambda: len(pulses()) >= 1, timeout_s=10, what=f"the pulse child of {worker.pid}")
    found = pulses()
    assert len(found) == 1, f"expected one pulse child of {worker.pid}, found {found}"
    return found[0]


def test_a_worker_whose_threads_all_hold_the_gil_stays_live_and_its_strict_session_works_after(
    client: Client, sessions: Callable[..., Session], liveness_worker: Callable[..., WorkerProcess], ttl_s: float,
) -> None:
    worker = liveness_worker()
    first, second = sessions(POOL, node=worker.node), sessions(POOL, node=worker.node)
    before = first.call("ping", timeout_s=30)
    hold_s = 3 * ttl_s
    # Both threads of the worker (concurrency 2) inside the regex engine, holding the GIL, for 3 TTLs.
    busy = [s.submit("hold_gil", seconds=hold_s, chunk_s=1.0) for s in (first, second)]
    # Sampled from the moment they are sent (the worker's own threads cannot say when they start: no GIL).
    hb_key, worker_key = names.heartbeat_key(worker.node), names.worker_key(worker.node)
    lapses, longest_beat_gap_s = 0, 0.0
    while not all(f.done() for f in busy):
        pipe = client.redis.pipeline(transaction=False)
        pipe.exists(hb_key)
        pipe.exists(worker_key)
        pipe.hget(worker_key, "last_beat")
        live, registered, last_beat = pipe.execute()
        lapses += not (live and registered)
        if last_beat:
            longest_beat_gap_s = max(longest_beat_gap_s, time.time() - float(last_beat))
        time.sleep(0.05)
    results = [f.result(60) for f in busy]
    assert all(r["held_s"] >= hold_s and r["longest_s"] > 0.1 for r in results)
    # The premise: the heartbeat thread itself was starved past the TTL...
    assert longest_beat_gap_s > ttl_s, f"heartbeat thread not starved (longest gap {longest_beat_gap_s:.2f} s)"
    # ...yet the worker never stopped being live, was never reaped, and its state is intact.
    assert lapses == 0
    after = first.call("ping", timeout_s=30)
    assert (after["pid"], after["seq"]) == (before["pid"], before["seq"] + 1)


def test_a_killed_worker_stops_being_live_at_once_and_its_pulse_exits(
    client: Client, sessions: Callable[..., Session], liveness_worker: Callable[..., WorkerProcess], ttl_s: float,
) -> None:
    worker = liveness_worker()
    pulse = pulse_of(worker)
    session = sessions(POOL, node=worker.node)
    session.call("ping", timeout_s=30)
    killed_at = time.monotonic()
    worker.kill()
    wait_until(lambda: not client.redis.exists(names.heartbeat_key(worker.node)), timeout_s=ttl_s,
               interval_s=0.01, what="heartbeat gone")
    assert time.monotonic() - killed_at < ttl_s
    wait_until(lambda: not pid_alive(pulse), timeout_s=10, what="pulse exit")
    with pytest.raises(SessionWorkerUnavailable):
        session.call("ping", timeout_s=30)


def test_a_cleanly_stopped_worker_takes_its_pulse_with_it(
    client: Client, liveness_worker: Callable[..., WorkerProcess],
) -> None:
    worker = liveness_worker()
    pulse = pulse_of(worker)
    worker.stop()
    assert worker.proc.returncode == 0
    wait_until(lambda: not pid_alive(pulse), timeout_s=10, what="pulse exit")
    assert not client.redis.exists(names.heartbeat_key(worker.node))


def test_a_hung_worker_declared_dead_comes_back_as_a_new_run_and_the_failure_its_caller_saw_stands(
    client: Client, sessions: Callable[..., Session], liveness_worker: Callable[..., WorkerProcess], ttl_s: float,
) -> None:
    stall_s = 1.0
    worker = liveness_worker(env={"FLAGSHIP_STALL_S": str(stall_s)})
    pulse = pulse_of(worker)
    hb_key = names.heartbeat_key(worker.node)
    incarnation = client.redis.get(hb_key)
    session = sessions(POOL, node=worker.node)
    marker = f"stalled-{uuid.uuid4().hex[:8]}"
    running = session.submit("record", marker=marker, sleep_s=2)
    wait_until(lambda: any(marker in e for e in client.redis.lrange(names.EXECUTIONS_KEY, -50, -1)), timeout_s=30,
               what="the call started")
    os.kill(worker.pid, signal.SIGSTOP)  # alive, but not one of its threads runs
    try:
        wait_until(lambda: not client.redis.exists(hb_key), timeout_s=stall_s + ttl_s + 10, what="heartbeat lapse")
        assert pid_alive(pulse)  # the pulse stopped renewing; it did not die
        reap_dead_workers(client.redis, POOL)  # what a peer's housekeeping or a producer's watch does
        assert not client.redis.sismember(names.pool_workers_key(POOL), worker.node)
        with pytest.raises(SessionWorkerUnavailable):
            running.result(timeout=30)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_until(lambda: client.redis.get(hb_key) not in (None, incarnation), timeout_s=30, what="live as a new run")
    wait_until(lambda: client.redis.sismember(names.pool_workers_key(POOL), worker.node), timeout_s=30,
               what="registered again")
    # The call resumed and finished; what its caller saw stands in the store too.
    key = client.app.backend.get_key_for_task(running.id)
    wait_until(lambda: client.redis.exists(key), timeout_s=30, what="the resumed call's result stored")
    stored = json.loads(client.redis.get(key))
    assert (stored["status"], stored["result"]["exc_type"]) == ("FAILURE", "SessionWorkerUnavailable")
    with pytest.raises(SessionWorkerUnavailable):  # its state is gone, wherever it would be rebound
        session.call("ping", timeout_s=30)
    assert sessions(POOL, node=worker.node).call("ping", timeout_s=30)["pid"] == worker.pid  # the new run serves


# -- the pulse on its own, fed by this test process ------------------------------------------------


@pytest.fixture
def redis(stack: Stack) -> Iterator[Redis]:
    r = Redis.from_url(stack.redis_url, decode_responses=True)
    yield r
    r.close()


def feeder(pulse: Pulse, every_s: float) -> Callable[[], None]:
    """Feed ``pulse`` from a thread until the returned function is called."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            pulse.feed()

    threading.Thread(target=run, daemon=True).start()
    return stop.set


def test_a_fed_pulse_keeps_the_key_past_its_ttl_and_deletes_it_when_its_parent_lets_go(
    stack: Stack, redis: Redis
) -> None:
    key, ttl_s = f"flagship:test:hb:{uuid.uuid4().hex}", 1.0
    redis.set(key, "run-1", px=int(ttl_s * 1000))
    pulse = Pulse(stack.redis_url, key, "run-1", ttl_s=ttl_s, interval_s=0.1, stall_s=60)
    pulse.start()
    stop_feeding = feeder(pulse, 0.1)
    try:
        until = time.monotonic() + 3 * ttl_s
        while time.monotonic() < until:
            assert redis.get(key) == "run-1"
            time.sleep(0.05)
    finally:
        stop_feeding()
        pulse.stop()
    assert pulse.proc is not None and pulse.proc.returncode == 0
    assert not redis.exists(key)


def test_a_pulse_never_touches_a_key_that_names_another_run(stack: Stack, redis: Redis) -> None:
    key = f"flagship:test:hb:{uuid.uuid4().hex}"
    redis.set(key, "run-1", px=60_000)
    pulse = Pulse(stack.redis_url, key, "run-1", ttl_s=1.0, interval_s=0.1, stall_s=60)
    pulse.start()
    try:
        redis.set(key, "run-2", px=500)  # a newer run of the node took over the name
        wait_until(lambda: not redis.exists(key), timeout_s=10, what="the newer run's key to expire")
        redis.set(key, "run-2", px=60_000)
    finally:
        pulse.stop()
    assert redis.get(key) == "run-2"  # neither renewed (it expired above) nor deleted on exit
    redis.delete(key)


def test_an_unfed_pulse_stops_renewing_after_its_stall_limit(stack: Stack, redis: Redis) -> None:
    key = f"flagship:test:hb:{uuid.uuid4().hex}"
    redis.set(key, "run-1", px=1000)
    pulse = Pulse(stack.redis_url, key, "run-1", ttl_s=1.0, interval_s=0.1, stall_s=1.0)
    pulse.start()
    try:
        wait_until(lambda: not redis.exists(key), timeout_s=10, what="key expiry")
        assert pulse.proc is not None and pulse.proc.poll() is None
        redis.set(key, "run-1", px=1000)
        pulse.feed()  # fed again: renewing again
        until = time.monotonic() + 0.8
        while time.monotonic() < until:
            assert redis.exists(key)
            time.sleep(0.05)
    finally:
        pulse.stop()


# -- the heartbeat thread survives anything ----------------------------------------------------------


class FlakySource:
    """A ``BeatSource`` whose housekeeping always fails and whose gauges fail once."""

    def __init__(self, registry: Registry, node: str) -> None:
        self.registry = registry
        self.node = node
        self.incarnation = f"{os.getpid()}-test"
        self.housekeeping_calls = 0
        self.gauge_calls = 0

    pool_name = "hb_test_pool"
    in_flight = 0

    def held_count(self) -> tuple[int, int] | None:
        return None

    def held_tags(self) -> list[str]:
        return []

    def take_touched(self) -> dict[str, float]:
        return {}

    def gauge_values(self) -> dict[str, int]:
        self.gauge_calls += 1
        if self.gauge_calls == 2:
            raise ValueError("gauge failed once")
        return {}

    def register(self) -> None:
        self.registry.register(WorkerInfo(node=self.node, pool=self.pool_name, host="test", pid=os.getpid(),
                                          queue=names.worker_queue(self.node), incarnation=self.incarnation))

    def reincarnate(self) -> None:
        self.register()

    def housekeeping(self) -> None:
        self.housekeeping_calls += 1
        sorted(["a", 1])  # type: ignore[list-item]  # what an int session id once did to the sweep


def test_the_heartbeat_thread_survives_any_exception_and_logs_each_failure_once(
    stack: Stack, redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(heartbeat, "housekeeping_interval_s", 0.05)
    settings = Settings.from_env()
    registry = Registry(redis, settings)
    source = FlakySource(registry, names.qualify_node(f"hb-{uuid.uuid4().hex[:6]}"))
    source.register()
    beat = Heartbeat(registry, SessionStore(redis), source, interval_s=0.05)
    caplog.set_level(logging.WARNING, logger="routing.fleet.heartbeat")
    beat.start()
    try:
        wait_until(lambda: source.housekeeping_calls >= 10, timeout_s=30, what="ten failed housekeeping rounds")
        assert beat.is_alive()
        registry.redis.pexpire(names.heartbeat_key(source.node), 100)
        wait_until(lambda: redis.pttl(names.heartbeat_key(source.node)) > 1000, timeout_s=10, what="beats go on")
    finally:
        beat.stop()
        registry.deregister(source.node, source.pool_name)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("housekeeping" in m and "TypeError" in m for m in messages) == 1
    assert sum("beat" in m and "gauge failed once" in m for m in messages) == 1
    assert sum("works again" in m for m in messages) == 1  # the beat recovered; housekeeping never did
    assert beat.errors >= 11
