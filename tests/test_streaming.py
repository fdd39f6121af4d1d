"""Streamed module calls through real workers: chunks as the LM writes them, each on its own call, in order."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from helpers import started_workers
from scripted_lm import scripted_reply

from routing import Client, Prediction, Session, StreamChunk, StreamStatus
from routing.errors import InvalidArgument, SessionWorkerUnavailable
from routing.producer.streams import CallStream
from tasks.local.stack import Stack, WorkerProcess
from tasks.ops.streaming import _Earlier

POOL = "stream_pool"
TWO_STEP = "user_programs.agents:TwoStep"


@pytest.fixture(scope="module")
def stream_workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    with started_workers(stack, [POOL, POOL]) as workers:
        yield workers


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(stream_pieces=8, chunk_delay_s=0.03) as fake:
        yield fake


def slow_session(open_session: Callable[..., Session], pool: str, fake: FakeOpenAI) -> Session:
    session = open_session(pool)
    session.lm("openai/fake-model", api_base=fake.base_url, api_key="sk-test")
    return session


def drain(stream: CallStream) -> tuple[list[Any], Prediction, float]:
    """Every item before the Prediction, the Prediction, and when the first chunk arrived."""
    items: list[Any] = []
    first = 0.0
    for item in stream:
        if isinstance(item, Prediction):
            return items, item, first
        if isinstance(item, StreamChunk) and not first:
            first = time.monotonic()
        items.append(item)
    raise AssertionError("the stream ended without its Prediction")


def joined(items: list[Any], field: str) -> str:
    return "".join(i.text for i in items if isinstance(i, StreamChunk) and i.field == field)


def test_32_concurrent_streams_over_two_workers_each_get_their_own_chunks_before_the_lm_finished(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], server: FakeOpenAI
) -> None:
    tickets = [f"Ticket {i}: I was charged twice for my subscription" for i in range(32)]
    modules = []
    for _ in tickets:
        session = slow_session(sessions, POOL, server)
        modules.append(session.chain_of_thought("ticket -> category, action"))
    assert len({m.session.worker for m in modules}) == 2
    streams = [m.stream(ticket=t) for m, t in zip(modules, tickets, strict=True)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(drain, streams))
    finished = {r.messages[-1]["content"].split("[[ ## ticket ## ]]")[-1].strip().split("\n")[0]: r.finished_at
                for r in server.requests if r.body.get("stream")}
    for stream, ticket, (items, prediction, first) in zip(streams, tickets, results, strict=True):
        assert all(i.call_id == stream.call_id for i in items)  # 0 misrouted
        assert {i.field for i in items if isinstance(i, StreamChunk)} == {"reasoning", "category", "action"}
        for field in ("reasoning", "category", "action"):
            assert joined(items, field) == prediction[field]
        assert 0 < first < finished[ticket]  # the first chunk came while the LM was still writing
    assert len({s.call_id for s in streams}) == 32


def test_offline_lm_streams_predict_and_chain_of_thought_in_pieces_and_astream_works(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    session = sessions(POOL)  # no provider: the offline LM
    predict = session.predict("ticket -> category, answer")
    cot = session.chain_of_thought("ticket -> category")
    items, prediction, _ = drain(predict.stream(ticket="I was double charged", fields=["answer"]))
    chunks = [i for i in items if isinstance(i, StreamChunk)]
    assert len(chunks) >= 2 and {c.field for c in chunks} == {"answer"} and chunks[0].predictor == "self"
    assert joined(items, "answer") == prediction.answer and prediction.answer.startswith("[offline]")

    async def collect() -> list[Any]:
        return [item async for item in cot.astream(ticket="The site is down", fields=["reasoning"])]

    got = asyncio.run(collect())
    assert isinstance(got[-1], Prediction)
    reasoning = [i for i in got if isinstance(i, StreamChunk)]
    assert len(reasoning) >= 2 and "".join(c.text for c in reasoning) == got[-1].reasoning


def test_a_user_program_streams_its_last_predictor(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], server: FakeOpenAI
) -> None:
    triage = slow_session(sessions, POOL, server).program(TWO_STEP)
    with triage.stream(ticket="The checkout page returns 502 errors") as stream:
        items, prediction, _ = drain(stream)
    chunks = [i for i in items if isinstance(i, StreamChunk)]
    assert {(c.field, c.predictor) for c in chunks} == {("action", "act")}
    assert joined(items, "action") == prediction.action and prediction.category
    with FakeOpenAI(reply=scripted_reply, stream_pieces=4) as react_server:  # a ReAct agent: tool statuses too
        agent = slow_session(sessions, POOL, react_server).program("user_programs.agents:order_agent")
        items, prediction, _ = drain(agent.stream(question="Where is my order A-17?", fields=["answer"]))
    statuses = [i.message for i in items if isinstance(i, StreamStatus)]
    assert statuses and "lookup_order" in statuses[0]
    assert joined(items, "answer") == prediction.answer == "Order A-17: shipped, arriving Tuesday"


def test_an_unknown_field_is_a_typed_error_before_anything_runs(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], client: Client
) -> None:
    session = sessions(POOL)
    predict = session.predict("ticket -> category")
    with pytest.raises(InvalidArgument, match="nope"):
        predict.stream(ticket="x", fields=["nope"])
    program = session.program(TWO_STEP)
    stream = program.stream(ticket="x", fields=["nope"])  # a program's fields are known on its worker
    with pytest.raises(InvalidArgument, match="nope"):
        next(stream)
    assert len(session.history(n=10)) == 0  # no LM was called


def test_closing_a_stream_mid_answer_cancels_the_call_and_its_worker_stops_streaming(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], client: Client
) -> None:
    with FakeOpenAI(stream_pieces=10, chunk_delay_s=0.3) as slow:
        predict = slow_session(sessions, POOL, slow).predict("ticket -> answer")
        stream = predict.stream(ticket="Tell me a long story")
        first = next(i for i in stream if isinstance(i, StreamChunk))
        stream.close()
        assert stream.future.cancelled() and first.call_id == stream.call_id
        with pytest.raises(StopIteration):
            next(stream)
        # The worker sees the revocation at its next chunk and stops: the session's next call runs after it.
        assert predict(ticket="short").answer
        meta = str(client.redis.get(f"celery-task-meta-{stream.call_id}"))
        assert "REVOKED" in meta or "CallCancelled" in meta
        entries = [fields["e"] for _, fields in client.redis.xrange(stream.key)]
        assert entries and all('"end"' not in e for e in entries) and len(entries) < 10


def test_breaking_out_of_a_stream_cancels_the_call_and_its_program_makes_no_further_lm_request(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], client: Client
) -> None:
    """No ``with``: the dropped iterator is collected, which cancels; the program's second predictor never asks."""
    reader = client.results.streams
    with FakeOpenAI(stream_pieces=10, chunk_delay_s=0.3) as slow:
        triage = slow_session(sessions, POOL, slow).program(TWO_STEP)
        for item in triage.stream(ticket="The checkout page returns 502 errors", fields=["category"]):
            if isinstance(item, StreamChunk):
                call_id = item.call_id
                break
        gc.collect()
        assert reader.open_count() == 0  # the stream is no longer read
        # The worker stops at its next chunk and waits for the run to end: the session's next call runs after it.
        assert triage(ticket="short").action
        meta = str(client.redis.get(f"celery-task-meta-{call_id}"))
        assert "REVOKED" in meta or "CallCancelled" in meta
        asked = [r for r in slow.requests if "The checkout page returns 502" in json.dumps(r.body)]
        assert len(asked) == 1  # classify only: the cancelled run's act request never went out


def test_a_forced_reconnect_of_the_stream_reader_loses_and_repeats_nothing(
    stream_workers: list[WorkerProcess], sessions: Callable[..., Session], client: Client
) -> None:
    with FakeOpenAI(stream_pieces=12, chunk_delay_s=0.1) as slow:
        predict = slow_session(sessions, POOL, slow).predict("ticket -> answer")
        reader = client.results.streams
        losses = reader.losses
        with predict.stream(ticket="Tell me a long story") as stream:
            items = [next(i for i in stream if isinstance(i, StreamChunk))]
            client.redis.execute_command("CLIENT", "KILL", "ID", reader.client_id)
            more, prediction, _ = drain(stream)
        items += more
    assert reader.losses == losses + 1
    assert joined(items, "answer") == prediction.answer and len(items) >= 3


def test_a_killed_worker_ends_its_stream_with_the_typed_error_after_the_chunks_delivered(
    pool_workers: Callable[..., list[WorkerProcess]], sessions: Callable[..., Session]
) -> None:
    [worker] = pool_workers("kill_pool", count=1)
    with FakeOpenAI(stream_pieces=10, chunk_delay_s=0.5) as slow:
        predict = slow_session(sessions, "kill_pool", slow).predict("ticket -> answer")
        stream = predict.stream(ticket="Tell me a long story")
        delivered = [next(i for i in stream if isinstance(i, StreamChunk))]
        worker.kill()
        with pytest.raises(SessionWorkerUnavailable):
            for item in stream:
                delivered.append(item)
    assert delivered[0].text and all(not isinstance(i, Prediction) for i in delivered)


def test_a_rerun_into_the_same_stream_writes_only_what_goes_beyond_the_earlier_run() -> None:
    """A call run again under its task id (redelivered after its worker was lost) finds the earlier run's pieces."""
    def entry(**fields: str) -> tuple[bytes, dict[bytes, bytes]]:
        return b"1-0", {b"e": json.dumps(fields).encode()}

    pieces = [entry(t="chunk", field="answer", text=t, predictor="self") for t in ("Once up", "on a")]
    earlier = _Earlier([entry(t="status", message="Calling"), *pieces])
    key = ("answer", "self")
    assert earlier.status() is False and earlier.status() is True  # the earlier run's one status, then new ones
    assert [earlier.chunk(key, t) for t in ["Once", " upon", " a time"]] == [("", False), ("", False), (" time", False)]
    assert earlier.chunk(("other", "self"), "new field") == ("new field", False)
    differs = _Earlier([entry(t="chunk", field="answer", text="Hello", predictor="self")])
    assert differs.chunk(key, "Hel") == ("", False)
    assert differs.chunk(key, "p!") == ("Help!", True)  # it came out different: the field starts over, said once
    assert differs.chunk(key, " more") == (" more", False)


def test_a_hint_call_its_dead_worker_held_runs_again_on_the_rebuilt_session(
    pool_workers: Callable[..., list[WorkerProcess]], sessions: Callable[..., Session]
) -> None:
    """The reaper moves it to the pool's queue; the worker there has no refs: ``rehydrate`` rebuilds and reruns it."""
    workers = pool_workers("hint_kill_pool", count=2)
    with FakeOpenAI(stream_pieces=10, chunk_delay_s=0.3) as slow:
        session = sessions("hint_kill_pool", rehydrate=True)
        session.lm("openai/fake-model", api_base=slow.base_url, api_key="sk-test")
        predict = session.predict("ticket -> answer")
        first_worker = session.worker
        with predict.stream(ticket="Tell me a long story", fields=["answer"]) as stream:
            items = [next(i for i in stream if isinstance(i, StreamChunk))]
            next(w for w in workers if w.node == first_worker).kill()
            items += list(stream)
        assert session.worker != first_worker and predict(ticket="and now?").answer  # the session serves on
    chunks, prediction = [i for i in items if isinstance(i, StreamChunk)], items[-1]
    assert isinstance(prediction, Prediction) and prediction.answer
    # The rerun writes to its caller's stream, past the pieces the dead run wrote: each piece once, none missing.
    assert "".join(c.text for c in chunks) == prediction.answer


def test_an_rlm_ref_streams_its_actions_reasoning_from_a_sandboxed_run(
    stack: Stack, sessions: Callable[..., Session]
) -> None:
    worker = stack.start_worker("rlm_pool", "rlm-stream-0", env={"FLAGSHIP_SANDBOX_TIMEOUT_S": "5"})
    try:
        session = sessions("rlm_pool")  # the offline LM: a scripted RLM run
        rlm = session.rlm("context, query -> output", max_iters=3)
        log = "\n".join(f"2026-01-0{i % 9 + 1} category=outage checkout 502" for i in range(40))
        with rlm.stream(context=log, query="How many outages?", fields=["reasoning"]) as stream:
            items, prediction, _ = drain(stream)
        chunks = [i for i in items if isinstance(i, StreamChunk)]
        assert len(chunks) >= 2 and {(c.field, c.predictor) for c in chunks} == {("reasoning", "generate_action")}
        assert prediction.output
    finally:
        worker.stop()
