"""Batched calls on real workers: ``session.map`` and ``ModuleRef.batch`` keep order, type per-item errors,
lose nothing; waiting is woken by the result listener from any thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from routing import Session
from routing.errors import InvalidArgument, OperationFailed, UnknownOperation

TRIAGE = "ticket -> category, urgency, action"
TICKETS = [
    ("outage", "Checkout API returns 502 for all customers since 09:00; the site is down."),
    ("billing", "I was charged twice on my last invoice, please refund one charge."),
    ("account", "Locked out after the 2FA reset, the password link never arrives."),
]


def test_map_runs_every_item_in_order_across_chunks_on_the_bound_worker(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    before = session.call("ping")["seq"]
    replies = session.map("ping", [{} for _ in range(1234)], chunk_size=100)
    assert [r["seq"] for r in replies] == list(range(before + 1, before + 1235))
    assert {r["node"] for r in replies} == {session.worker}
    assert session.call("ping")["seq"] == before + 1235  # the session still works, in order


def test_a_failing_item_is_typed_and_loses_nothing(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    items = [{}, {"sleep_s": -1}, {}, {"bogus": 1}, {}]
    with pytest.raises(InvalidArgument) as raised:
        session.map("ping", items)
    assert raised.value.op == "ping" and "sleep_s" in raised.value.reason
    # Every item ran: the good ones advanced the session's sequence.
    mixed = session.map("ping", items, return_exceptions=True)
    assert [type(r).__name__ for r in mixed] == ["dict", "InvalidArgument", "dict", "InvalidArgument", "dict"]
    assert [r["seq"] for r in mixed if isinstance(r, dict)] == [4, 5, 6]


def test_bad_map_requests_are_refused_at_the_door_or_typed(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    with pytest.raises(InvalidArgument):
        session.map("ping", [{}, "not a dict"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        session.map("ping", [{}], chunk_size=0)
    with pytest.raises(UnknownOperation):
        session.map("no_such_op", [{}])
    with pytest.raises(InvalidArgument):
        session.map("map", [{"op": "ping", "items": []}])  # no maps inside maps
    assert session.map("ping", []) == []
    assert session.call("ping")["node"] == session.worker


def test_module_batch_returns_outputs_in_order_like_dspy_batch(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    triage = session.predict(TRIAGE)
    examples = [{"ticket": text} for _, text in TICKETS] * 7
    outputs = triage.batch(examples, num_threads=4, chunk_size=5)
    assert [o["category"] for o in outputs] == [label for label, _ in TICKETS] * 7
    failed = triage.batch([{"ticket": TICKETS[0][1]}, {"wrong": "x"}], return_exceptions=True)
    assert failed[0]["category"] == "outage" and isinstance(failed[1], InvalidArgument)
    history = session.history(n=100)
    assert len(history) >= len(examples)


def test_results_can_be_awaited_from_many_threads_at_once(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    futures = [session.submit("ping", sleep_s=0.05) for _ in range(20)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def wait(i: int) -> None:
        try:
            results[i] = futures[i].result(30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i]["seq"] for i in range(20)] == list(range(1, 21))  # each thread got its own call's reply


def test_an_operation_failure_inside_a_batch_keeps_its_type(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    replies = session.map("history", [{"n": 1}, {"n": "x"}], return_exceptions=True)
    assert isinstance(replies[0], dict)
    assert isinstance(replies[1], (InvalidArgument, OperationFailed))


def test_client_map_spreads_one_program_over_every_live_worker_in_input_order(client, stack) -> None:
    examples = [{"ticket": text} for _, text in TICKETS] * 30
    result = client.map("triage_pool", TRIAGE, examples, chunk_size=8, progress=False)
    assert [o["category"] for o in result.outputs] == [label for label, _ in TICKETS] * 30
    live = {w.node for w in stack.workers if w.pool == "triage_pool" and w.alive()}
    assert set(result.per_worker) == live and sum(result.per_worker.values()) == len(examples)
    assert result.summary()["failures"] == {} and client.sessions.all() is not None


def test_client_map_by_default_gives_each_worker_an_even_share_in_one_chunk(client, stack) -> None:
    live = [w for w in stack.workers if w.pool == "triage_pool" and w.alive()]
    assert len(live) == 2
    threads = min(info.concurrency for info in client.registry.workers(["triage_pool"]) if info.live)
    examples = [{"ticket": text} for _, text in TICKETS] * (2 * threads // len(TICKETS) + 1)
    result = client.map("triage_pool", TRIAGE, examples, progress=False)
    assert [o["category"] for o in result.outputs] == [label for label, _ in TICKETS] * (len(examples) // 3)
    # Two chunks of one worker's threads' worth at least: one chunk each, not both on the first worker.
    share = -(-len(examples) // len(live))
    assert sorted(result.per_worker.values()) == sorted([share, len(examples) - share])


def test_default_chunk_size_gives_every_worker_equal_chunks_of_at_most_eight_examples_per_thread() -> None:
    from types import SimpleNamespace

    from routing.producer.fleet_map import default_chunk_size

    two = [SimpleNamespace(slots=64), SimpleNamespace(slots=64)]
    assert default_chunk_size(1000, two) == 500  # type: ignore[arg-type]
    assert default_chunk_size(1030, two) == 258  # two chunks each, not 512 + 512 + 6  # type: ignore[arg-type]
    assert default_chunk_size(100_000, two) == 511  # type: ignore[arg-type]
    assert default_chunk_size(10, two) == 5  # type: ignore[arg-type]
    assert default_chunk_size(100, [SimpleNamespace(slots=64)] * 4) == 25  # every worker gets some
    assert default_chunk_size(90, [SimpleNamespace(slots=4)] * 3) == 30  # type: ignore[arg-type]


def _two_kill_pool_shares(client, pool_workers):
    """Two fresh ``kill_pool`` workers (by node) and a map share on each (a session bound to it)."""
    from routing.producer.fleet_map import ProgramSpec, Worker

    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    shares = [Worker(client.session("kill_pool", node=node), ProgramSpec("predict", TRIAGE), slots=2)
              for node in workers]
    return workers, shares


def test_client_map_reruns_the_chunks_of_a_worker_that_dies(client, pool_workers) -> None:
    from routing.producer.fleet_map import FleetMap

    workers, shares = _two_kill_pool_shares(client, pool_workers)
    doomed = shares[0].session.worker
    examples = [{"ticket": text} for _, text in TICKETS] * 40
    killed: list[str] = []

    def kill_once(_: int) -> None:
        if not killed:
            workers[doomed].kill()
            killed.append(doomed)

    result = FleetMap(shares, examples, chunk_size=10, on_progress=kill_once).run(timeout_s=60)
    assert [o["category"] for o in result.outputs] == [label for label, _ in TICKETS] * 40
    assert result.rerun_chunks >= 1 and sum(result.per_worker.values()) == len(examples)
    for share in shares:
        share.session.close()


def test_client_map_skips_a_worker_found_dead_before_its_first_chunk(client, pool_workers) -> None:
    from helpers import wait_until

    from routing.errors import SessionWorkerUnavailable
    from routing.producer.fleet_map import FleetMap

    workers, shares = _two_kill_pool_shares(client, pool_workers)
    dead_share, live_share = shares
    doomed, survivor = dead_share.session.worker, live_share.session.worker
    workers[doomed].kill()

    def seen_dead() -> bool:
        try:
            client.router.route(dead_share.session.binding)
        except SessionWorkerUnavailable:
            return True
        return False

    wait_until(seen_dead, timeout_s=30, what="the producer to see the worker gone")
    examples = [{"ticket": text} for _, text in TICKETS] * 5
    result = FleetMap(shares, examples, chunk_size=5).run(timeout_s=60)
    assert [o["category"] for o in result.outputs] == [label for label, _ in TICKETS] * 5
    assert result.per_worker == {survivor: len(examples)} and result.rerun_chunks == 0
    live_share.session.close()


MAP_SCRIPT = """
import json, sys
from routing import Client
client = Client.from_env()
examples = [{"ticket": "I was charged twice on my last invoice, please refund one charge."}] * 24
result = client.map("triage_pool", "ticket -> category, urgency, action", examples, chunk_size=4)
print(json.dumps(result.summary()["examples"]))
client.close()
"""


def _run_map_script(stack, tty: bool) -> str:
    import os
    import pty
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": stack.redis_url, "COLUMNS": "100"}
    if not tty:
        done = subprocess.run([sys.executable, "-c", MAP_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", MAP_SCRIPT], env=env, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(120) == 0, b"".join(chunks).decode(errors="replace")
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_client_map_shows_a_progress_bar_on_a_terminal_only(stack) -> None:
    on_terminal = _run_map_script(stack, tty=True)
    piped = _run_map_script(stack, tty=False)
    assert "24/24" in on_terminal and "map" in on_terminal
    assert "24/24" not in piped and piped.strip().endswith("24")
