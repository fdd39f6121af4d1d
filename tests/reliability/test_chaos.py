"""The bounded chaos test: ≥ 2,000 calls over strict (rehydrating) and hint sessions, ≥ 4 kill -9.

Workers are killed at random moments, preferably while they run calls and more
wait (calls being popped), and restarted under the same node name. The harness is
``flagship bench chaos``'s (``tasks/bench/chaos.py``), run shorter.
"""

from __future__ import annotations

from collections.abc import Callable

from routing import Client
from tasks.bench.chaos import HINT_POOL, STRICT_POOL, Chaos, render
from tasks.local.stack import Stack, WorkerProcess

#: A call must settle (value or typed error) within this long of its submission.
SETTLE_BOUND_S = 45.0


def test_chaos_loses_no_call_hangs_none_and_counts_every_duplicate(
    stack: Stack, client: Client, pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    workers = {pool: pool_workers(pool, 2) for pool in (STRICT_POOL.name, HINT_POOL.name)}
    chaos = Chaos(stack, client, workers, sessions_per_pool=6, in_flight_per_session=4,
                  settle_bound_s=SETTLE_BOUND_S, kill_gap_s=(0.5, 2.5))
    try:
        report = chaos.run(seconds=15, min_calls=2000, min_kills=4, max_seconds=120)
    finally:
        for restarted in chaos.workers.values():
            for worker in restarted:
                worker.stop()
    print(render(report), "\nkills:", report["kill_log"], "rehydrations:", report["rehydrations"])
    assert report["kills"] >= 4 and not report["chaos_errors"], report
    assert report["sent"] >= 2000, report
    assert report["lost"] == 0, report  # every call settled within the bound: no loss, no hang
    assert report["untyped_errors"] == {}, report
    assert report["completed"] + sum(report["typed_errors"].values()) == report["sent"], report
    assert report["completed_without_execution"] == 0, report
    # Every duplicate execution of a task id is one the workers counted as a rerun (a call delivered
    # again without a stored result); completed calls delivered again were answered from the store.
    assert report["duplicate_executions"] <= report["system"]["reruns"], report
    assert report["uncounted_duplicates"] == 0, report  # per task id: each one that ran twice was counted
    assert report["max_settle_s"] <= SETTLE_BOUND_S, report
