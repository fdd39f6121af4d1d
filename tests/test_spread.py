"""Even spread: sessions land on the least-loaded live worker; hint calls reach a worker that joins.

Correctness, not speed (``flagship bench scale`` measures the throughput).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from helpers import wait_until

from routing import Client, Session, names
from routing.fleet.registry import Liveness
from routing.producer.slots import DirectSlots
from tasks.local.stack import WorkerProcess

POOL = "spread_pool"  # hint, two threads per worker (tests/conftest.py)
StartWorkers = Callable[..., list[WorkerProcess]]


def view(in_flight: int, concurrency: int = 2, live: bool = True, draining: bool = False) -> Liveness:
    return Liveness(live=live, in_flight=in_flight, concurrency=concurrency, draining=draining)


# -- which hint sessions a worker serves from its direct queue (no server needed) ---------------------


def test_a_worker_serves_at_most_as_many_hint_sessions_as_it_has_threads() -> None:
    slots = DirectSlots(hold_s=60)
    idle = view(in_flight=0)
    assert [slots.take("w1", s, idle) for s in ("a", "b", "c")] == [True, True, False]
    assert slots.take("w1", "a", view(in_flight=2)), "a session holding a slot keeps it while it calls"
    assert not slots.take("w1", "c", idle), "the third session goes to the shared queue"


def test_a_worker_busy_with_calls_of_others_takes_no_new_session() -> None:
    slots = DirectSlots(hold_s=60)
    assert not slots.take("w1", "a", view(in_flight=2))
    assert slots.take("w1", "a", view(in_flight=1))


def test_dead_or_draining_workers_get_no_hint_calls() -> None:
    slots = DirectSlots(hold_s=60)
    assert not slots.take("w1", "a", view(in_flight=0, live=False))
    assert not slots.take("w1", "a", view(in_flight=0, draining=True))


def test_a_session_that_moves_or_stops_calling_frees_its_slot() -> None:
    slots = DirectSlots(hold_s=60)
    idle = view(in_flight=0)
    assert slots.take("w1", "a", idle) and slots.take("w1", "b", idle)
    assert slots.take("w2", "a", idle)  # a ran on w2 (the shared queue) and now lives there
    assert slots.take("w1", "c", idle)
    brief = DirectSlots(hold_s=0.05)
    assert brief.take("w1", "a", idle) and brief.take("w1", "b", idle) and not brief.take("w1", "c", idle)
    held_until = time.monotonic() + 0.05
    while time.monotonic() <= held_until:
        time.sleep(0.01)
    assert brief.take("w1", "c", idle), "slots of sessions that stopped calling are free again"


# -- real workers -----------------------------------------------------------------------------------


def test_sessions_opened_back_to_back_land_evenly_on_every_live_worker(
    sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = pool_workers(POOL, 4)
    opened = [sessions(POOL) for _ in range(8)]
    assert Counter(s.worker for s in opened) == {w.node: 2 for w in workers}


def test_a_worker_that_joins_a_running_pool_receives_the_next_sessions(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    first = pool_workers(POOL, 2)
    before = [sessions(POOL) for _ in range(4)]
    assert Counter(s.worker for s in before) == {w.node: 2 for w in first}
    (joined,) = pool_workers(POOL, 1)
    after = [sessions(POOL) for _ in range(2)]
    assert [s.worker for s in after] == [joined.node, joined.node]
    assert client.redis.scard(names.worker_sessions_key(joined.node)) == 2
    assert Counter(s.worker for s in [sessions(POOL) for _ in range(3)]) == {w.node: 1 for w in [*first, joined]}


def test_hint_calls_beyond_a_busy_workers_threads_are_run_by_a_worker_that_joins(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    (busy,) = pool_workers(POOL, 1)
    holders = [sessions(POOL) for _ in range(2)]
    held = [s.submit("ping", sleep_s=12.0) for s in holders]  # longer than a worker's start on a loaded machine
    assert [f.target for f in held] == [busy.node, busy.node]  # they take its two threads
    wait_until(lambda: client.registry.liveness([busy.node])[busy.node].in_flight == 2, what="both threads busy")
    waiting = [sessions(POOL) for _ in range(2)]
    assert {s.worker for s in waiting} == {busy.node}  # the only live worker
    futures = [s.submit("ping") for s in waiting]
    # Not the busy worker's own queue, where only it could take them: the shared queue.
    assert [f.target for f in futures] == [None, None]
    (joined,) = pool_workers(POOL, 1)
    results = [f.result(10) for f in futures]
    assert {r["node"] for r in results} == {joined.node}
    assert [s.worker for s in waiting] == [joined.node, joined.node]  # rebound where they ran
    # The records are rebound by the worker right after it stored each result (CallTask.after_return).
    wait_until(lambda: {client.sessions.get(s.id).worker for s in waiting} == {joined.node}, what="records rebound")
    assert all(f.result(20)["node"] == busy.node for f in held)


def test_a_hint_session_calling_steadily_keeps_its_worker(
    sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    pool_workers(POOL, 2)
    session = sessions(POOL)
    bound = session.worker
    assert {session.call("ping", timeout_s=10)["node"] for _ in range(30)} == {bound}
    assert session.worker == bound


def test_a_burst_of_hint_calls_over_more_sessions_than_threads_all_complete_in_session_order(
    sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = pool_workers(POOL, 2)
    opened = [sessions(POOL) for _ in range(8)]  # four sessions per worker, two threads each
    futures = [(s, s.submit("ping", sleep_s=0.1)) for s in opened for _ in range(3)]
    results = [(s, f.result(30)) for s, f in futures]
    assert {r["node"] for _, r in results} == {w.node for w in workers}
    for session in opened:  # calls of one session on one worker ran one at a time, in order
        ran = [r for s, r in results if s is session]
        for node in {r["node"] for r in ran}:
            on_node = [r for r in ran if r["node"] == node]
            assert [r["seq"] for r in on_node] == sorted(r["seq"] for r in on_node)
            assert all(a["ended"] <= b["started"] for a, b in zip(on_node, on_node[1:]))
