"""No hint call lost, effectively once for completed work: each mechanism on its own, against real workers.

The chaos test (test_chaos.py) shows them together at random moments; here each
case is set up exactly: a worker killed between the broker's pop and kombu's
un-acked record, an un-acked call no live worker holds, a completed call delivered
again, a redelivered call that never completed.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable

import pytest
from helpers import wait_until

from routing import Client, Session, names
from routing.broker.envelope import UNACKED_INDEX_KEY, UNACKED_KEY
from routing.producer.binding import Waiting
from routing.producer.future import CallFuture
from tasks.local.stack import WorkerProcess

StartWorkers = Callable[..., list[WorkerProcess]]
POOL = "noloss_pool"
#: How long a call sent to a stopped worker may take to be popped by its pending BRPOP (kombu's lasts 1 s).
brpop_window_s = 3.0
#: A queue no worker consumes: messages are built there, then placed by hand.
HOLD_QUEUE = "flagship.test.hold"


def stat(client: Client, name: str) -> int:
    return int(client.redis.hget(names.STATS_KEY, name) or 0)


def executions(client: Client, task_id: str) -> list[dict[str, str]]:
    entries = [json.loads(raw) for raw in client.redis.lrange(names.EXECUTIONS_KEY, 0, -1)]
    return [e for e in entries if e["task_id"] == task_id]


def nowhere(client: Client, task_id: str) -> bool:
    """The call's message is in no queue of the pool and not un-acked (it sits in a process's socket)."""
    queues = [names.pool_queue(POOL), *(names.worker_queue(n) for n in client.redis.smembers(
        names.pool_workers_key(POOL)))]
    listed = [raw for q in queues for raw in client.redis.lrange(q, 0, -1)] + client.redis.hvals(UNACKED_KEY)
    return not any(task_id in raw for raw in listed)


def built_message(client: Client, session: Session, marker: str, task_id: str, track: bool,
                  sent_at: float | None = None) -> dict[str, object]:
    """A real call message for ``session`` (as the router sends it), taken from a queue nobody reads.

    ``track``: the client waits for it like for any hint call it sent (what the sweep looks after).
    """
    route = {"node": None, "pool": POOL, "affinity": "hint", "ttl_s": session.ttl_s, "incarnation": None,
             "sent_at": time.time() if sent_at is None else sent_at}
    args = [session.id, "record", {"marker": marker}, route]
    if track:
        client.results.expect(task_id, Waiting(session.id, False, None, None, POOL, args))
    client.app.send_task(names.CALL_TASK, args=args, queue=HOLD_QUEUE, task_id=task_id)
    raw = client.redis.rpop(HOLD_QUEUE)
    assert raw is not None
    message: dict[str, object] = json.loads(raw)
    return message


def popped_by_stopped(client: Client, submit: Callable[[], CallFuture], worker: WorkerProcess,
                      prepare: Callable[[], object] = lambda: None, attempts: int = 5) -> CallFuture:
    """A call (``submit()``) popped by ``worker`` while it is stopped: in its socket, in no queue, not un-acked.

    Only a BRPOP pending at the stop pops the call; kombu re-issues its BRPOP every
    second, so a stop that falls between two finds none and the call stays queued:
    the worker is then resumed (the call runs as usual) and the stop tried again.
    """
    for _ in range(attempts):
        prepare()  # before the stop: the call must follow it at once, while the BRPOP is still pending
        os.kill(worker.pid, signal.SIGSTOP)
        future = submit()
        deadline = time.monotonic() + brpop_window_s
        while time.monotonic() < deadline:
            if nowhere(client, future.id):
                return future
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGCONT)
        future.result(30)
    pytest.fail(f"no stop of {worker.node} caught a pending BRPOP in {attempts} attempts")


def delivered_again(message: dict[str, object], queue: str) -> str:
    """The message as kombu restores it (``redelivered``), routed to ``queue``."""
    headers, properties = message["headers"], message["properties"]
    assert isinstance(headers, dict) and isinstance(properties, dict)
    headers["redelivered"] = True
    properties["delivery_info"] = {"exchange": queue, "routing_key": queue, "redelivered": True}
    return json.dumps(message)


def test_a_hint_call_popped_by_a_worker_killed_before_recording_it_is_resent_and_runs_once(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers(POOL, 2)}
    session = sessions(POOL)
    doomed = session.worker
    assert doomed is not None
    other = next(n for n in workers if n != doomed)
    session.call("ping", timeout_s=10)
    resent_before = stat(client, "resent")

    # A stopped worker's pending BRPOP still pops: the message goes into its socket, and nowhere else.
    def submit() -> CallFuture:
        future = session.submit("record", marker=f"popped-{uuid.uuid4().hex[:8]}")
        assert future.target == doomed
        return future

    future = popped_by_stopped(client, submit, workers[doomed])
    workers[doomed].kill()

    result = future.result(30)
    assert result["node"] == other
    assert [e["node"] for e in executions(client, future.id)] == [other]
    assert stat(client, "resent") == resent_before + 1
    assert session.call("ping", timeout_s=10)["node"] == other


def test_a_hint_call_lost_by_a_worker_the_session_never_used_is_found_through_the_pool_watch(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers(POOL, 2)}
    hinted = sessions(POOL)
    busy = hinted.worker
    assert busy is not None
    taker = next(n for n in workers if n != busy)
    holders: list[CallFuture] = []

    def saturate() -> None:
        holders.extend(sessions(POOL, node=busy, affinity="strict_queue").submit("ping", sleep_s=3.0)
                       for _ in range(2))
        wait_until(lambda: client.watch.get(busy).saturated, what="the bound worker saturated")

    def submit() -> CallFuture:
        future = hinted.submit("record", marker=f"shared-{uuid.uuid4().hex[:8]}")
        assert future.target is None
        return future

    # The other worker, which no session of this client uses, pops the call from the shared queue and dies.
    future = popped_by_stopped(client, submit, workers[taker], prepare=saturate)
    # Followed within a membership read: the pool has a pending hint call.
    wait_until(lambda: client.watch.get(taker) is not None, timeout_s=5, what="the watch follows the pool")
    workers[taker].kill()

    assert future.result(30)["node"] == busy
    assert [e["node"] for e in executions(client, future.id)] == [busy]
    for holder in holders:
        holder.result(10)


def test_an_unacked_call_no_live_worker_holds_is_moved_to_the_shared_queue_and_runs(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers(POOL, 2)
    session = sessions(POOL)
    task_id = str(uuid.uuid4())
    message = built_message(client, session, "orphan", task_id, track=True)
    tag = f"dead-worker-tag-{uuid.uuid4().hex[:8]}"  # as if a worker died right after recording it
    client.redis.hset(UNACKED_KEY, tag, json.dumps([message, POOL, POOL]))
    client.redis.zadd(UNACKED_INDEX_KEY, {tag: 0})
    requeued_before = stat(client, "orphans_requeued")

    client.sweep.schedule([POOL])  # what a worker's death triggers
    wait_until(lambda: executions(client, task_id), timeout_s=30, what="the orphan ran")
    assert not client.redis.hexists(UNACKED_KEY, tag)
    assert stat(client, "orphans_requeued") == requeued_before + 1
    stored = client.results.settle_stored([task_id])  # settled already by the listener: nothing left to settle
    assert stored == set() and len(executions(client, task_id)) == 1


def test_a_completed_call_delivered_again_is_answered_from_the_store_not_run(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    (worker,) = pool_workers(POOL, 1)
    session = sessions(POOL)
    done = session.submit("record", marker="once")
    assert done.result(10)["marker"] == "once"
    stored = client.redis.get(f"celery-task-meta-{done.id}")
    answered_before = stat(client, "answered_from_store")
    message = built_message(client, session, "once", done.id, track=False)

    client.redis.lpush(names.pool_queue(POOL), delivered_again(message, names.pool_queue(POOL)))
    wait_until(lambda: stat(client, "answered_from_store") == answered_before + 1, timeout_s=15,
               what="the worker answers from the store")
    assert len(executions(client, done.id)) == 1
    assert client.redis.get(f"celery-task-meta-{done.id}") == stored
    wait_until(lambda: not any(done.id in raw for raw in client.redis.hvals(UNACKED_KEY)), what="acked")
    assert worker.alive()


def test_a_redelivered_call_without_a_stored_result_runs_and_counts_as_a_rerun(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers(POOL, 1)
    session = sessions(POOL)
    task_id = str(uuid.uuid4())
    message = built_message(client, session, "again", task_id, track=False)
    reruns_before = stat(client, "reruns")

    client.redis.lpush(names.pool_queue(POOL), delivered_again(message, names.pool_queue(POOL)))
    wait_until(lambda: client.redis.get(f"celery-task-meta-{task_id}"), timeout_s=15, what="the result")
    assert len(executions(client, task_id)) == 1
    assert stat(client, "reruns") == reruns_before + 1


def test_the_late_original_of_a_resent_call_is_answered_from_the_store_not_run_again(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    """A worker paused between the broker's pop and its un-acked record delivers the original after the resend ran."""
    pool_workers(POOL, 1)
    session = sessions(POOL)
    resent = session.submit("record", marker="resent copy")
    assert resent.result(10)["marker"] == "resent copy"
    client.redis.zadd(names.RESENT_KEY, {resent.id: time.time()})  # what the sweep records before resending
    answered_before = stat(client, "answered_from_store")
    original = built_message(client, session, "resent copy", resent.id, track=False, sent_at=time.time() - 30)

    client.redis.lpush(names.pool_queue(POOL), json.dumps(original))  # no redelivery mark: only its age tells
    wait_until(lambda: stat(client, "answered_from_store") == answered_before + 1, timeout_s=15,
               what="the worker answers the late original from the store")
    assert len(executions(client, resent.id)) == 1


def test_a_late_original_running_beside_its_resent_copy_counts_as_a_rerun(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers(POOL, 1)
    session = sessions(POOL)
    task_id = str(uuid.uuid4())
    client.redis.zadd(names.RESENT_KEY, {task_id: time.time()})
    original = built_message(client, session, "late", task_id, track=False, sent_at=time.time() - 30)
    reruns_before = stat(client, "reruns")

    client.redis.lpush(names.pool_queue(POOL), json.dumps(original))
    wait_until(lambda: client.redis.get(f"celery-task-meta-{task_id}"), timeout_s=15, what="the result")
    assert len(executions(client, task_id)) == 1
    assert stat(client, "reruns") == reruns_before + 1


def test_a_late_call_that_was_never_resent_runs_once_and_is_not_counted(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers(POOL, 1)
    session = sessions(POOL)
    task_id = str(uuid.uuid4())
    original = built_message(client, session, "slow queue", task_id, track=False, sent_at=time.time() - 30)
    reruns_before, answered_before = stat(client, "reruns"), stat(client, "answered_from_store")

    client.redis.lpush(names.pool_queue(POOL), json.dumps(original))
    wait_until(lambda: client.redis.get(f"celery-task-meta-{task_id}"), timeout_s=15, what="the result")
    assert len(executions(client, task_id)) == 1
    assert (stat(client, "reruns"), stat(client, "answered_from_store")) == (reruns_before, answered_before)
