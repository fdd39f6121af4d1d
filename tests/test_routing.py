"""Session binding and strict/hint routing, proven by which worker process ran each call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import wait_until, worker_by_node

from routing import Client, Session
from routing.errors import WorkerBusy
from routing.fleet.registry import Liveness
from tasks.local.stack import Stack


def saturate(sessions: Callable[..., Session], pool: str, node: str, hold_s: float, concurrency: int = 2) -> list:
    """Occupy every thread of ``node`` with sleeping pings from sessions pinned to it."""
    return [
        sessions(pool, node=node, affinity="strict_queue").submit("ping", sleep_s=hold_s)
        for _ in range(concurrency)
    ]


def wait_saturated(client: Client, node: str) -> Liveness:
    return wait_until(lambda: (v := client.registry.liveness([node])[node]).saturated and v,  # type: ignore[return-value]
                      what=f"{node} saturated")


def test_two_sessions_opened_back_to_back_bind_to_different_workers(stack: Stack, sessions) -> None:
    first, second = sessions("triage_pool"), sessions("triage_pool")
    assert first.worker != second.worker
    for session in (first, second):
        expected_pid = worker_by_node(stack, session.worker).pid
        pings = [session.call("ping", timeout_s=10) for _ in range(20)]
        assert {p["pid"] for p in pings} == {expected_pid}
        assert {p["node"] for p in pings} == {session.worker}


def test_session_record_in_redis_names_the_bound_worker(client: Client, sessions) -> None:
    session = sessions("triage_pool")
    record = client.sessions.get(session.id)
    assert (record.pool, record.worker, record.affinity.value) == ("triage_pool", session.worker, "strict_queue")


def test_lazy_session_binds_on_its_first_call(client: Client, sessions) -> None:
    session = sessions("triage_pool", bind="lazy")
    assert session.worker is None and client.sessions.get(session.id).worker is None
    ran_on = session.call("ping", timeout_s=10)["node"]
    assert session.worker == ran_on == client.sessions.get(session.id).worker


def test_fifty_async_calls_of_one_session_run_in_submission_order_one_at_a_time(sessions) -> None:
    session = sessions("triage_pool")
    futures = [session.submit("ping", sleep_s=0.004 * (i % 3)) for i in range(50)]
    results = [f.result(30) for f in futures]
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    for earlier, later in zip(results, results[1:]):
        assert earlier["ended"] <= later["started"], "two calls of one session overlapped"


def test_calls_of_different_sessions_on_one_worker_run_concurrently(sessions) -> None:
    first = sessions("triage_pool")
    second = sessions("triage_pool", node=first.worker)
    a, b = first.submit("ping", sleep_s=1.5), second.submit("ping", sleep_s=1.5)
    ra, rb = a.result(10), b.result(10)
    assert ra["node"] == rb["node"] == first.worker
    assert ra["started"] < rb["ended"] and rb["started"] < ra["ended"], "sessions were serialised"


def test_strict_fail_fast_raises_worker_busy_while_the_bound_worker_is_busy(client: Client, sessions) -> None:
    fast = sessions("triage_pool", affinity="strict_fail_fast")
    holders = saturate(sessions, "triage_pool", fast.worker, hold_s=3.0)
    view = wait_saturated(client, fast.worker)
    with pytest.raises(WorkerBusy) as raised:
        fast.call("ping", timeout_s=10)
    assert (raised.value.node, raised.value.session_id, raised.value.limit) == (fast.worker, fast.id, view.concurrency)
    for holder in holders:
        holder.result(10)
    wait_until(lambda: not client.registry.liveness([fast.worker])[fast.worker].saturated, what="worker free")
    assert fast.call("ping", timeout_s=10)["node"] == fast.worker


def test_strict_queue_waits_for_the_busy_bound_worker_and_succeeds(client: Client, sessions) -> None:
    queued = sessions("triage_pool", affinity="strict_queue")
    holders = saturate(sessions, "triage_pool", queued.worker, hold_s=1.0)
    wait_saturated(client, queued.worker)
    result = queued.call("ping", timeout_s=15)
    held = [h.result(10) for h in holders]
    assert result["node"] == queued.worker
    assert result["started"] >= min(h["ended"] for h in held), "the call did not wait for a free thread"


def test_hint_session_moves_to_the_other_worker_when_its_worker_is_saturated(client: Client, sessions) -> None:
    hinted = sessions("analytics_pool")
    bound = hinted.worker
    holders = saturate(sessions, "analytics_pool", bound, hold_s=1.5)
    wait_saturated(client, bound)
    wait_until(lambda: client.watch.get(bound).saturated, what="client view of saturation")
    result = hinted.call("ping", timeout_s=10)
    assert result["node"] != bound
    assert hinted.worker == result["node"]
    # The record is rebound by the worker right after it stored the result (CallTask.after_return).
    wait_until(lambda: client.sessions.get(hinted.id).worker == result["node"], what="the record rebound")
    for holder in holders:
        holder.result(10)
