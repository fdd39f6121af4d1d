"""Workers dying, stopping, joining late and losing the broker connection."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
import redis as redis_lib
from helpers import wait_until

from routing import Client, Session, names
from routing.errors import DeadLettered, InvalidArgument, SessionWorkerUnavailable
from routing.settings import Settings
from tasks.local.stack import Stack, WorkerProcess

StartWorkers = Callable[..., list[WorkerProcess]]


def test_strict_call_after_kill_9_fails_fast_and_queued_calls_on_live_worker_are_not_lost(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    doomed, survivor = sessions("kill_pool"), sessions("kill_pool")
    assert doomed.worker != survivor.worker
    waiting = doomed.submit("ping", sleep_s=30)  # running on the worker when it dies
    backlog = [survivor.submit("ping", sleep_s=0.2)] + [survivor.submit("ping") for _ in range(10)]

    killed_at = time.monotonic()
    workers[doomed.worker].kill()
    with pytest.raises(SessionWorkerUnavailable) as raised:
        waiting.result(30)
    with pytest.raises(SessionWorkerUnavailable):
        doomed.call("ping", timeout_s=30)
    elapsed_s = time.monotonic() - killed_at
    assert raised.value.node == doomed.worker
    assert elapsed_s <= Settings.from_env().heartbeat_ttl_s + 1.0

    done = [f.result(15) for f in backlog]
    assert [d["seq"] for d in done] == list(range(1, 12))
    assert {d["pid"] for d in done} == {workers[survivor.worker].pid}


def test_hint_calls_queued_on_a_killed_worker_move_to_the_shared_queue(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("hint_kill_pool", 2)}
    hinted = sessions("hint_kill_pool")
    dead = hinted.worker
    other = next(n for n in workers if n != dead)
    # Two slow calls occupy the worker; the rest wait in its direct queue (or its prefetch).
    futures = [hinted.submit("ping", sleep_s=1.0) for _ in range(6)]
    wait_until(lambda: client.registry.liveness([dead])[dead].in_flight >= 1, what="calls received")
    workers[dead].kill()
    results = [f.result(30) for f in futures[2:]]
    assert all(r["node"] == other for r in results)
    assert hinted.call("ping", timeout_s=10)["node"] == other
    assert hinted.worker == other
    assert client.redis.llen(names.worker_queue(dead)) == 0


def test_clean_stop_deregisters_at_once_and_hint_sessions_continue_elsewhere(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("stop_pool", 2)}
    hinted = sessions("stop_pool")
    first = hinted.worker
    workers[first].stop()
    assert not client.redis.exists(names.heartbeat_key(first))
    assert first not in client.redis.smembers(names.pool_workers_key("stop_pool"))
    wait_until(lambda: not client.watch.get(first).live, what="client sees the stop")
    results = [hinted.call("ping", timeout_s=10) for _ in range(5)]
    survivor = next(n for n in workers if n != first)
    assert {r["node"] for r in results} == {survivor}
    assert client.sessions.get(hinted.id).worker == survivor


def test_a_worker_started_later_joins_and_receives_new_sessions(
    stack: Stack, client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    (early,) = pool_workers("late_pool", 1)
    first = sessions("late_pool")
    assert first.worker == early.node
    (late,) = pool_workers("late_pool", 1)
    second = sessions("late_pool")
    assert second.worker == late.node
    assert second.call("ping", timeout_s=10)["pid"] == late.pid
    assert first.call("ping", timeout_s=10)["pid"] == early.pid


def test_worker_still_consumes_its_direct_queue_after_a_broker_reconnect(
    stack: Stack, client: Client, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    before = session.call("ping", timeout_s=10)
    admin = redis_lib.Redis.from_url(stack.redis_url)
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed > 0
    # Heartbeats come back once the worker reconnected; then strict calls reach its direct queue.
    wait_until(lambda: client.redis.exists(names.heartbeat_key(session.worker)), timeout_s=20,
               what="heartbeat after reconnect")
    after = session.call("ping", timeout_s=30)
    assert after["pid"] == before["pid"] and after["seq"] == before["seq"] + 1


def test_sigterm_lets_running_calls_finish_and_loses_no_queued_call(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("stop_pool", 2)}
    strict = sessions("stop_pool", affinity="strict_queue")
    leaving = strict.worker
    hinted = sessions("stop_pool", node=leaving)
    other = next(n for n in workers if n != leaving)
    running = strict.submit("ping", sleep_s=1.5)
    wait_until(lambda: client.registry.liveness([leaving])[leaving].in_flight >= 1, what="call running")
    queued = [hinted.submit("ping", sleep_s=0.05) for _ in range(8)]
    workers[leaving].proc.send_signal(signal.SIGTERM)

    assert running.result(20)["node"] == leaving  # finished during the warm shutdown, not cut off
    results = [f.result(30) for f in queued]
    assert len(results) == 8 and {r["node"] for r in results} <= {leaving, other}
    assert workers[leaving].proc.wait(20) == 0
    assert not client.redis.exists(names.heartbeat_key(leaving))
    with pytest.raises(SessionWorkerUnavailable):
        strict.call("ping", timeout_s=10)
    assert hinted.call("ping", timeout_s=10)["node"] == other


def test_a_worker_restarted_under_the_same_name_does_not_pass_for_the_old_one(
    stack: Stack, client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    session = sessions("kill_pool")
    node = session.worker
    waiting = session.submit("ping", sleep_s=30)
    wait_until(lambda: client.registry.liveness([node])[node].in_flight >= 1, what="call running")
    workers[node].kill()
    reborn = stack.start_worker("kill_pool", node)  # same node name, new run, empty memory
    try:
        with pytest.raises(SessionWorkerUnavailable):
            waiting.result(30)  # not a 30 s sleep nor a visibility-timeout hang
        with pytest.raises(SessionWorkerUnavailable):
            session.call("ping", timeout_s=10)
        rebuilt = session.call("ping", timeout_s=10, rehydrate=True)
        assert session.rehydrations == 1 and rebuilt["node"] == session.worker
        assert rebuilt["pid"] in {reborn.pid} | {w.pid for w in workers.values() if w.alive()}
        fresh = sessions("kill_pool", node=node)
        assert fresh.call("ping", timeout_s=10)["pid"] == reborn.pid
    finally:
        reborn.stop()


def test_hint_call_held_by_a_killed_worker_from_the_shared_queue_is_requeued(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("hint_kill_pool", 2)}
    hinted = sessions("hint_kill_pool")
    busy = hinted.worker
    other = next(n for n in workers if n != busy)
    holders = [sessions("hint_kill_pool", node=busy, affinity="strict_queue").submit("ping", sleep_s=2.0)
               for _ in range(2)]
    wait_until(lambda: client.watch.get(busy).saturated, what="bound worker saturated")
    shared_call = hinted.submit("ping", sleep_s=5.0)
    assert shared_call.target is None  # went to the shared queue
    wait_until(lambda: json.loads(client.redis.hget(names.worker_key(other), "holding") or "[]"),
               what="the other worker reports holding it")
    workers[other].kill()
    assert shared_call.result(30)["node"] == busy
    for holder in holders:
        holder.result(10)


def test_calls_that_fail_before_their_turn_do_not_block_the_session(
    client: Client, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    queue = names.worker_queue(session.worker)
    bad_route = client.app.send_task(names.CALL_TASK, args=[session.id, "ping", {}, {"affinity": "bogus"}],
                                     queue=queue)
    missing_arg = client.app.send_task(names.CALL_TASK, args=[session.id, "ping", {}], queue=queue)
    with pytest.raises(InvalidArgument):
        bad_route.get(timeout=10)
    with pytest.raises(DeadLettered):  # a call Celery could not even bind never runs (tasks.worker.poison)
        missing_arg.get(timeout=10)
    assert session.call("ping", timeout_s=10)["node"] == session.worker


def test_opening_an_existing_session_again_keeps_its_binding(
    client: Client, sessions: Callable[..., Session]
) -> None:
    first = sessions("triage_pool")
    for _ in range(3):
        assert client.session("triage_pool", session_id=first.id).worker == first.worker
        assert client.attach(first.id).worker == first.worker


def test_a_second_live_worker_with_the_same_name_refuses_to_start(
    stack: Stack, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    (original,) = pool_workers("small_pool", 1)
    session = sessions("small_pool")
    assert session.worker == original.node
    duplicate = stack.start_worker("small_pool", session.worker, wait=False)
    assert duplicate.proc.wait(30) == 78
    assert "already runs as" in duplicate.log_tail()
    assert session.call("ping", timeout_s=10)["node"] == session.worker
