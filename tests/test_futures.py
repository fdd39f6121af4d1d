"""Calls as standard futures and asyncio awaitables, predictions with attribute access (real workers)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import as_completed, wait

import pytest

from routing import Prediction, Session, agather
from routing.errors import CallTimeout

TRIAGE = "ticket -> category, urgency, action"
BILLING = "I was charged twice on my last invoice, please refund one charge."


def test_futures_of_two_sessions_work_with_as_completed_and_wait(sessions: Callable[..., Session]) -> None:
    a, b = sessions("triage_pool"), sessions("triage_pool")
    slow, fast = a.submit("ping", sleep_s=0.6), b.submit("ping")
    order = [f for f in as_completed([slow, fast], timeout=30)]
    assert order == [fast, slow]
    done, not_done = wait([a.submit("ping"), b.submit("ping")], timeout=30)
    assert len(done) == 2 and not not_done
    assert {f.result()["node"] for f in done} == {a.worker, b.worker}


def test_result_timeout_is_typed_and_the_call_still_completes(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    future = session.submit("ping", sleep_s=0.8)
    with pytest.raises(CallTimeout):
        future.result(timeout=0.1)
    with pytest.raises(CallTimeout):
        future.result(timeout_s=0.1)  # the older spelling still works
    assert future.result(timeout=30)["seq"] == 1 and future.done() and future.exception() is None


def test_eight_threads_wait_on_one_call_and_a_callback_fires_once(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    future = session.submit("ping", sleep_s=0.3)
    fired: list[object] = []
    future.add_done_callback(fired.append)
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.append(future.result(30)["seq"])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [1] * 8
    assert fired == [future]
    future.add_done_callback(fired.append)  # added after it settled: runs at once, still once
    assert fired == [future, future]


def test_cancel_revokes_a_queued_call_which_never_runs(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    running = session.submit("ping", sleep_s=1.0)
    queued = session.submit("ping")
    assert queued.cancel() and queued.cancelled()
    assert running.result(30)["seq"] == 1
    assert session.call("ping", timeout=30)["seq"] == 2  # the cancelled call took no turn
    assert not running.cancel()  # settled calls cannot be cancelled


def test_asyncio_gathers_200_calls_on_one_loop(sessions: Callable[..., Session]) -> None:
    opened = [sessions("triage_pool") for _ in range(4)]

    async def main() -> list[dict]:
        started = threading.active_count()
        calls = [opened[i % 4].acall("ping") for i in range(200)]
        replies = await asyncio.gather(*calls)
        assert threading.active_count() - started < 50  # no thread per pending call
        submitted = [opened[0].submit("ping") for _ in range(3)]
        assert [r["seq"] for r in await agather(submitted)] == [51, 52, 53]
        assert (await opened[1].submit("ping"))["seq"] == 51
        return replies

    replies = asyncio.run(main())
    for i, session in enumerate(opened):
        assert sorted(r["seq"] for r in replies[i::4]) == list(range(1, 51))
        assert {r["node"] for r in replies[i::4]} == {session.worker}


def test_predictions_have_attribute_access_and_stay_json(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    triage = session.predict(TRIAGE)
    pred = triage(ticket=BILLING)
    assert isinstance(pred, Prediction)
    assert pred.category == pred["category"] == "billing"
    assert json.loads(json.dumps(pred))["category"] == "billing"
    with pytest.raises(AttributeError):
        _ = pred.no_such_field

    async def main() -> list:
        one = await triage.acall(ticket=BILLING)
        many = await triage.abatch([{"ticket": BILLING}] * 3, num_threads=2)
        return [one, *many]

    assert [p.category for p in asyncio.run(main())] == ["billing"] * 4
