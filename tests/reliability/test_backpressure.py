"""Backpressure: a call that cannot start within its pool's ``queue_timeout_s`` fails and never runs;
a worker whose direct queue holds ``max_queued`` calls refuses the next one before anything is sent."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest
from helpers import wait_until

from routing import Client, PoolTable, Session, Settings, names
from routing.errors import PoolSaturated, QueueTimeout
from routing.pools import DEFAULT_MAX_QUEUED, Pool
from routing.producer.future import gather
from routing.producer.recovery.backlog import Backlog
from routing.producer.results.listener import RESULT_KEY_PREFIX
from tasks.local.stack import Stack, WorkerProcess

StartWorkers = Callable[..., list[WorkerProcess]]
#: How late (beyond its deadline) a queued call may fail on a loaded machine.
SLACK_S = 5.0


def _queued(client: Client, session: Session) -> int:
    return int(client.redis.llen(names.worker_queue(session.worker or "")))


def _stored_error(client: Client, task_id: str) -> str | None:
    """The exception type a worker stored for ``task_id`` (None: no worker answered it)."""
    raw = client.redis.get(RESULT_KEY_PREFIX + task_id)
    return None if raw is None else json.loads(raw)["result"]["exc_type"]


# -- the pool table ---------------------------------------------------------------


def test_strict_pools_get_a_10_s_queue_timeout_and_every_pool_1000_queued_calls_per_worker() -> None:
    table = PoolTable.load(json.dumps({"fast": {"affinity": "strict_fail_fast"}, "loose": {"affinity": "hint"},
                                       "rlm_pool": {"affinity": "hint"}}))
    assert {p.name: p.queue_timeout_s for p in table} == {
        "triage_pool": 10.0, "rlm_pool": None, "analytics_pool": None, "fast": 10.0, "loose": None}
    assert {p.max_queued for p in table} == {DEFAULT_MAX_QUEUED} == {1000}
    assert Pool("p").queue_timeout_s == 10.0 and Pool("p", "hint").queue_timeout_s is None  # type: ignore[arg-type]


def test_pool_limits_come_from_the_pools_json_and_0_or_null_turns_them_off() -> None:
    table = PoolTable.load(json.dumps({
        "a": {"queue_timeout_s": 2.5, "max_queued": 5},
        "b": {"queue_timeout_s": 0, "max_queued": None},
        "c": {"affinity": "hint", "queue_timeout_s": 30},
    }))
    got = {p.name: (p.queue_timeout_s, p.max_queued) for p in table if p.name in "abc"}
    assert got == {"a": (2.5, 5), "b": (None, None), "c": (30.0, DEFAULT_MAX_QUEUED)}
    assert PoolTable.load(table.to_json()).pools == table.pools  # the form handed to child processes


@pytest.mark.parametrize("bad", [{"queue_timeout_s": -1}, {"queue_timeout_s": "10"}, {"queue_timeout_s": True},
                                 {"max_queued": -5}, {"max_queued": 2.5}, {"max_queued": "many"}])
def test_pool_limits_refuse_negative_or_non_numeric_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PoolTable.load(json.dumps({"p": bad}))


# -- queue_timeout_s -------------------------------------------------------------------


def test_a_call_still_queued_at_its_deadline_fails_then_and_never_runs(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers("bp_pool", 1)  # one worker, one thread: a running call keeps every other in the queue
    session = sessions("bp_pool")
    timeout_s = client.pools.get("bp_pool").queue_timeout_s
    assert timeout_s == 1.0
    busy = session.submit("ping", sleep_s=8 + SLACK_S)
    wait_until(lambda: _queued(client, session) == 0, what="the long call taken by the worker")
    sent_at = time.monotonic()
    late = session.submit("ping")
    big = session.submit("payload_size", data="x" * 100_000)  # its argument travels by claim-check
    claim_keys = f"flagship:claim:{session.id}:*"
    assert _queued(client, session) == 2 and len(client.redis.keys(claim_keys)) == 1

    with pytest.raises(QueueTimeout) as raised:
        late.result(timeout_s + SLACK_S)
    waited_s = time.monotonic() - sent_at
    assert not busy.done()  # the producer took it back; the worker never saw it
    assert raised.value.as_dict() == {"session_id": session.id, "op": "ping", "timeout_s": timeout_s}
    assert timeout_s <= waited_s <= timeout_s + SLACK_S
    with pytest.raises(QueueTimeout):
        big.result(SLACK_S)
    assert _queued(client, session) == 0
    assert client.redis.keys(claim_keys) == []  # a call that can never run leaves no stored argument

    assert busy.result(30)["seq"] == 1
    assert session.call("ping", timeout_s=10)["seq"] == 2  # the timed-out call never ran
    assert _stored_error(client, late.id) is None and _stored_error(client, big.id) is None
    wait_until(lambda: client.router.deadlines.tracked() == 0, what="settled calls forgotten by the sweeper")


def test_a_call_held_by_its_worker_behind_a_long_one_fails_at_its_deadline_not_at_its_turn(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers("bp_turn_pool", 1)  # the session's second call is received and parked behind the first
    session = sessions("bp_turn_pool")
    timeout_s = client.pools.get("bp_turn_pool").queue_timeout_s
    assert timeout_s == 3.0
    sent_at = time.monotonic()
    first = session.submit("ping", sleep_s=timeout_s + SLACK_S)
    second = session.submit("ping")
    wait_until(lambda: _queued(client, session) == 0, timeout_s=timeout_s, what="both calls received by the worker")

    with pytest.raises(QueueTimeout) as raised:
        second.result(2 * timeout_s + 3 * SLACK_S)
    failed_after = time.monotonic() - sent_at
    # At its deadline (the goal: within ~0.5 s of it), while the first call still runs.
    assert timeout_s - 0.05 <= failed_after < timeout_s + 1.0, failed_after
    assert not first.done()
    assert raised.value.timeout_s == timeout_s
    assert _stored_error(client, second.id) == "QueueTimeout"  # the worker's verdict, through the result store
    assert first.result(3 * SLACK_S)["seq"] == 1
    assert session.call("ping", timeout_s=10)["seq"] == 2  # the refused call never ran


def test_calls_that_start_in_time_are_unaffected_by_the_queue_timeout(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers("bp_pool", 1)
    session = sessions("bp_pool")
    replies = gather([session.submit("ping") for _ in range(20)], timeout_s=30)
    assert [r["seq"] for r in replies] == list(range(1, 21))
    wait_until(lambda: client.router.deadlines.tracked() == 0, what="settled calls forgotten by the sweeper")


# -- max_queued ---------------------------------------------------------------------


def test_a_full_direct_queue_refuses_the_next_call_at_once_and_sends_nothing(
    stack: Stack, client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers("bp_full_pool", 1)
    session = sessions("bp_full_pool")
    limit = client.pools.get("bp_full_pool").max_queued
    assert limit == 5
    worker_key = names.worker_key(session.worker or "")
    drains_before = int(client.redis.hget(worker_key, "drains") or 0)
    busy = session.submit("ping", sleep_s=3.0)
    wait_until(lambda: _queued(client, session) == 0, what="the long call taken by the worker")
    # ... and started: the drain that popped it counted it as held (``drains`` moves on); the worker's
    # next heartbeat says it started (``held`` back to 0 after that drain, never the value before it).
    wait_until(
        lambda: int(client.redis.hget(worker_key, "drains") or 0) > drains_before
        and client.redis.hget(worker_key, "held") == "0",
        what="it started",
    )
    waiting = [session.submit("ping") for _ in range(limit)]
    assert _queued(client, session) == limit

    with pytest.raises(PoolSaturated) as raised:
        session.submit("ping")
    assert raised.value.as_dict() == {"pool": "bp_full_pool", "node": session.worker, "queued": limit, "limit": limit}
    assert _queued(client, session) == limit  # nothing was sent
    other = Client(stack.redis_url, Settings.from_env())  # another producer sees the same queue
    try:
        with pytest.raises(PoolSaturated):
            other.attach(session.id).submit("ping")
    finally:
        other.close()
    assert _queued(client, session) == limit

    replies = gather([busy, *waiting], timeout_s=60)
    assert [r["seq"] for r in replies] == list(range(1, limit + 2))
    assert session.call("ping", timeout_s=10)["seq"] == limit + 2  # drained: accepted again


def test_the_shared_queue_holds_max_queued_calls_per_registered_worker(client: Client) -> None:
    pool = f"bp-shared-{uuid.uuid4().hex}"
    queue, workers = names.pool_queue(pool), names.pool_workers_key(pool)
    backlog = Backlog(client.redis)
    try:
        client.redis.rpush(queue, "a", "b")
        with pytest.raises(PoolSaturated) as raised:  # no worker registered: the limit of one
            backlog.admit(pool, None, 2)
        assert (raised.value.queued, raised.value.limit) == (2, 2)
        client.redis.sadd(workers, "w1@host", "w2@host")
        for item in ("c", "d"):  # two workers: room for four
            backlog.admit(pool, None, 2)
            client.redis.rpush(queue, item)
        with pytest.raises(PoolSaturated) as raised:  # the estimate reached the limit; a fresh read confirms it
            backlog.admit(pool, None, 2)
        assert (raised.value.queued, raised.value.limit) == (4, 4)
        client.redis.lpop(queue)
        backlog.admit(pool, None, 2)  # one was taken: room again
        backlog.admit(pool, None, None)  # no limit: never refused, nothing read
    finally:
        client.redis.delete(queue, workers)
