"""Bad input at every door: a typed error within 5 s, nothing written to Redis, workers serving after.

The catalogue (:data:`CASES`) is a table of (entry point, bad input, expected
error); ``docs/reliability.md`` shows the same table. Each case runs against the
shared real workers. Worker-side checks (the authority) are shown with raw Celery
messages that skip every producer check.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from celery import Celery
from helpers import wait_until

from routing import Client, Settings, names, validate
from routing.broker.celery_config import celery_config
from routing.errors import (
    DeadLettered,
    FlagshipError,
    InvalidArgument,
    InvalidSignature,
    UnknownOperation,
    UnknownPool,
)
from routing.fleet.heartbeat import housekeeping_interval_s
from routing.producer.handles import LMRef, ModuleRef
from routing.producer.session import Session
from tasks.local.stack import Stack

#: Every rejection is this quick (no hang, no retry loop).
deadline_s = 5.0
#: The doors' client holds contexts up to this size (the setting is read, not only the default).
context_limit = 2 << 20
BIG = "x" * (10 << 20)  # the 10 MB Predict input that kept a worker busy for 11-25 s
OVER = "x" * ((1 << 20) + 1)  # one byte over the default FLAGSHIP_MAX_INPUT_BYTES


@dataclass
class Doors:
    client: Client
    session: Session
    lm: LMRef
    module: ModuleRef


Case = tuple[str, str, Callable[[Doors], Any], type[FlagshipError]]


def _session(**kwargs: Any) -> Callable[[Doors], Any]:
    return lambda d: d.client.session("triage_pool", **kwargs)


CASES: list[Case] = [
    ("Client.session", "pool=42", lambda d: d.client.session(42), UnknownPool),  # type: ignore[arg-type]
    ("Client.session", "pool=['triage_pool']", lambda d: d.client.session(["triage_pool"]), UnknownPool),  # type: ignore[arg-type]
    ("Client.session", "pool='no_such_pool'", lambda d: d.client.session("no_such_pool"), UnknownPool),
    ("Client.session", "session_id=42", _session(session_id=42), InvalidArgument),
    ("Client.session", "session_id=['a']", _session(session_id=["a"]), InvalidArgument),
    ("Client.session", "session_id=''", _session(session_id=""), InvalidArgument),
    ("Client.session", "session_id='K:recipes'", _session(session_id="K:recipes"), InvalidArgument),
    ("Client.session", "session_id of 129 chars", _session(session_id="a" * 129), InvalidArgument),
    ("Client.session", "session_id='a b'", _session(session_id="a b"), InvalidArgument),
    ("Client.session", "affinity='bogus'", _session(affinity="bogus"), InvalidArgument),
    ("Client.session", "affinity=3", _session(affinity=3), InvalidArgument),
    ("Client.session", "ttl_s='abc'", _session(ttl_s="abc"), InvalidArgument),
    ("Client.session", "ttl_s=1e30", _session(ttl_s=1e30), InvalidArgument),
    ("Client.session", "ttl_s=-5", _session(ttl_s=-5), InvalidArgument),
    ("Client.session", "ttl_s=0", _session(ttl_s=0), InvalidArgument),
    ("Client.session", "ttl_s=nan", _session(ttl_s=math.nan), InvalidArgument),
    ("Client.session", "ttl_s=True", _session(ttl_s=True), InvalidArgument),
    ("Client.session", "ttl_s=-5, bind='lazy'", _session(ttl_s=-5, bind="lazy"), InvalidArgument),
    ("Client.session", "bind='later'", _session(bind="later"), InvalidArgument),
    ("Client.session", "node=5", _session(node=5), InvalidArgument),
    ("Client.session", "rehydrate='yes'", _session(rehydrate="yes"), InvalidArgument),
    ("Client.attach", "session_id=42", lambda d: d.client.attach(42), InvalidArgument),  # type: ignore[arg-type]
    ("Client.attach", "session_id='K:recipes'", lambda d: d.client.attach("K:recipes"), InvalidArgument),
    ("Client.attach", "rehydrate='yes'", lambda d: d.client.attach(d.session.id, rehydrate="yes"), InvalidArgument),  # type: ignore[arg-type]
    ("Client.map", "pool=42", lambda d: d.client.map(42, "a -> b", [{"a": "x"}]), UnknownPool),  # type: ignore[arg-type]
    ("Client.map", "module='react'", lambda d: d.client.map("triage_pool", "a -> b", [], module="react"),
     InvalidArgument),
    ("Client.map", "signature=5", lambda d: d.client.map("triage_pool", 5, [{"a": "x"}]), InvalidSignature),  # type: ignore[arg-type]
    ("Client.map", "examples='abc'", lambda d: d.client.map("triage_pool", "a -> b", "abc"), InvalidArgument),  # type: ignore[arg-type]
    ("Client.map", "examples=[1, 2]", lambda d: d.client.map("triage_pool", "a -> b", [1, 2]), InvalidArgument),  # type: ignore[list-item]
    ("Client.map", "an example field of 10 MB", lambda d: d.client.map("triage_pool", "a -> b", [{"a": BIG}]),
     InvalidArgument),
    ("Client.map", "lm={'bogus': 1}", lambda d: d.client.map("triage_pool", "a -> b", [], lm={"bogus": 1}),
     InvalidArgument),
    ("Client.map", "lm={'temperature': 'hot'}",
     lambda d: d.client.map("triage_pool", "a -> b", [], lm={"temperature": "hot"}), InvalidArgument),
    ("Client.map", "chunk_size=0", lambda d: d.client.map("triage_pool", "a -> b", [], chunk_size=0),
     InvalidArgument),
    ("Client.map", "timeout_s=-1", lambda d: d.client.map("triage_pool", "a -> b", [], timeout_s=-1),
     InvalidArgument),
    ("Client.map", "progress='yes'", lambda d: d.client.map("triage_pool", "a -> b", [], progress="yes"),  # type: ignore[arg-type]
     InvalidArgument),
    ("Session.call", "op=5", lambda d: d.session.call(5), InvalidArgument),  # type: ignore[arg-type]
    ("Session.call", "op=''", lambda d: d.session.call(""), InvalidArgument),
    ("Session.call", "op='no_such_op'", lambda d: d.session.call("no_such_op", timeout=deadline_s), UnknownOperation),
    ("Session.call", "timeout=-1", lambda d: d.session.call("ping", timeout=-1), InvalidArgument),
    ("Session.call", "timeout=0", lambda d: d.session.call("ping", timeout=0), InvalidArgument),
    ("Session.call", "timeout=nan", lambda d: d.session.call("ping", timeout=math.nan), InvalidArgument),
    ("Session.call", "timeout_s='5'", lambda d: d.session.call("ping", timeout_s="5"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.call", "ping sleep_s='long'", lambda d: d.session.call("ping", sleep_s="long"), InvalidArgument),
    ("Session.call", "ping sleep_s=1e9", lambda d: d.session.call("ping", sleep_s=1e9), InvalidArgument),
    ("Session.call", "unknown argument", lambda d: d.session.call("ping", bogus=1, timeout=deadline_s),
     InvalidArgument),
    ("Session.call", "an argument that is not JSON", lambda d: d.session.call("payload_size", data=object()),
     InvalidArgument),
    ("Session.submit", "rehydrate='yes'", lambda d: d.session.submit("ping", rehydrate="yes"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.submit", "an argument over FLAGSHIP_MAX_CONTEXT_BYTES",
     lambda d: d.session.submit("payload_size", data="x" * (context_limit + 1)), InvalidArgument),
    ("Session.acall", "op=5", lambda d: asyncio.run(d.session.acall(5)), InvalidArgument),  # type: ignore[arg-type]
    ("Session.map", "kwargs_list=5", lambda d: d.session.map("ping", 5), InvalidArgument),  # type: ignore[arg-type]
    ("Session.map", "kwargs_list=[1]", lambda d: d.session.map("ping", [1]), InvalidArgument),  # type: ignore[list-item]
    ("Session.map", "op='map'", lambda d: d.session.map("map", [{}]), InvalidArgument),
    ("Session.map", "num_threads=0", lambda d: d.session.map("ping", [{}], num_threads=0), InvalidArgument),
    ("Session.map", "chunk_size=0", lambda d: d.session.map("ping", [{}], chunk_size=0), InvalidArgument),
    ("Session.map", "timeout_s=-1", lambda d: d.session.map("ping", [{}], timeout_s=-1), InvalidArgument),
    ("Session.map", "an oversized item after 600 good ones (2 chunks)",
     lambda d: d.session.map("payload_size", [{}] * 600 + [{"data": "x" * (context_limit + 1)}]), InvalidArgument),
    ("Session.amap", "kwargs_list=5", lambda d: asyncio.run(d.session.amap("ping", 5)), InvalidArgument),  # type: ignore[arg-type]
    ("Session.context", "text=5", lambda d: d.session.context(5), InvalidArgument),  # type: ignore[arg-type]
    ("Session.context", "text over FLAGSHIP_MAX_CONTEXT_BYTES", lambda d: d.session.context("x" * (context_limit + 1)),
     InvalidArgument),
    ("Session.lm", "temperature='hot'", lambda d: d.session.lm(temperature="hot"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.lm", "temperature=5", lambda d: d.session.lm(temperature=5), InvalidArgument),
    ("Session.lm", "max_tokens=0", lambda d: d.session.lm(max_tokens=0), InvalidArgument),
    ("Session.lm", "model=5", lambda d: d.session.lm(5), InvalidArgument),  # type: ignore[arg-type]
    ("Session.predict", "signature=5", lambda d: d.session.predict(5), InvalidSignature),  # type: ignore[arg-type]
    ("Session.predict", "lm='lm-1' (not a handle)", lambda d: d.session.predict("a -> b", lm="lm-1"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.predict", "instructions=5", lambda d: d.session.predict("a -> b", instructions=5), InvalidArgument),  # type: ignore[arg-type]
    ("Session.rlm", "max_iters=0", lambda d: d.session.rlm(max_iters=0), InvalidArgument),
    ("Session.configure", "lm='lm-1'", lambda d: d.session.configure("lm-1"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.release", "ref='x'", lambda d: d.session.release("x"), InvalidArgument),  # type: ignore[arg-type]
    ("Session.history", "n=-1", lambda d: d.session.history(n=-1), InvalidArgument),
    ("Session.history", "n='all'", lambda d: d.session.history(n="all"), InvalidArgument),  # type: ignore[arg-type]
    ("ModuleRef.__call__", "a 10 MB input field", lambda d: d.module(ticket=BIG), InvalidArgument),
    ("ModuleRef.__call__", "an input field 1 byte over 1 MiB", lambda d: d.module(ticket=OVER), InvalidArgument),
    ("ModuleRef.__call__", "timeout=-1", lambda d: d.module(ticket="x", timeout=-1), InvalidArgument),
    ("ModuleRef.__call__", "65 input fields", lambda d: d.module(**{f"f{i}": "x" for i in range(65)}),
     InvalidArgument),
    ("ModuleRef.submit", "a 10 MB input field", lambda d: d.module.submit(ticket=BIG), InvalidArgument),
    ("ModuleRef.acall", "a 10 MB input field", lambda d: asyncio.run(d.module.acall(ticket=BIG)), InvalidArgument),
    ("ModuleRef.batch", "examples='abc'", lambda d: d.module.batch("abc"), InvalidArgument),  # type: ignore[arg-type]
    ("ModuleRef.batch", "examples=[1]", lambda d: d.module.batch([1]), InvalidArgument),  # type: ignore[list-item]
    ("ModuleRef.batch", "an example field of 10 MB", lambda d: d.module.batch([{"ticket": BIG}]), InvalidArgument),
    ("ModuleRef.batch", "num_threads=0", lambda d: d.module.batch([{"ticket": "x"}], num_threads=0), InvalidArgument),
    ("ModuleRef.batch", "timeout_s=-1", lambda d: d.module.batch([{"ticket": "x"}], timeout_s=-1), InvalidArgument),
    ("ModuleRef.abatch", "an example field of 10 MB", lambda d: asyncio.run(d.module.abatch([{"ticket": BIG}])),
     InvalidArgument),
]


@pytest.fixture(scope="module")
def doors(stack: Stack) -> Iterator[Doors]:
    client = Client(stack.redis_url, replace(Settings.from_env(), max_context_bytes=context_limit))
    session = client.session("triage_pool")
    lm = session.lm()
    module = session.predict("ticket -> category", lm=lm)
    yield Doors(client, session, lm, module)
    session.close()
    client.close()


def written_keys(client: Client) -> set[str]:
    """Session records, sub-keys and claims: what a rejected call must not create."""
    found = set(client.redis.scan_iter(match=names.PREFIX + ":session:*", count=1000))
    found |= set(client.redis.scan_iter(match=names.PREFIX + ":claim:*", count=1000))
    return found | {f"member:{sid}" for sid in client.redis.smembers(names.SESSIONS_KEY)}


@pytest.mark.parametrize(("entry", "bad", "call", "error"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_every_door_refuses_bad_input_with_a_typed_error_and_writes_nothing(
    doors: Doors, entry: str, bad: str, call: Callable[[Doors], Any], error: type[FlagshipError]
) -> None:
    before = written_keys(doors.client)
    started = time.monotonic()
    with pytest.raises(error):
        call(doors)
    assert time.monotonic() - started < deadline_s
    assert written_keys(doors.client) <= before, f"{entry} ({bad}) wrote to Redis before refusing"
    assert doors.session.call("ping", timeout=deadline_s)["session_id"] == doors.session.id  # still serving


def test_the_workers_serve_normal_calls_after_the_catalogue(doors: Doors) -> None:
    assert doors.module(ticket="Checkout returns 502", timeout=30)["category"]
    fresh = doors.client.session("triage_pool", ttl_s=60)
    assert fresh.call("ping", timeout=10)["seq"] == 1
    ctx = fresh.context("x" * context_limit)  # exactly at the limit: accepted, and sent by reference
    assert ctx.chars == context_limit
    fresh.close()


def test_a_session_id_can_never_name_another_sessions_sub_key(client: Client) -> None:
    first = f"K{uuid.uuid4().hex}"
    session = client.session("triage_pool", first)
    session.lm()  # writes flagship:session:<K>:recipes
    recipes_key = names.session_recipes_key(first)
    assert client.redis.exists(recipes_key)
    for colliding in (f"{first}:recipes", f"{first}:contexts", f"{first}:"):
        with pytest.raises(InvalidArgument):
            client.session("triage_pool", colliding)
        with pytest.raises(InvalidArgument):
            client.attach(colliding)
    assert client.redis.exists(recipes_key) and client.sessions.exists(first)
    # No valid id contains ':' so no session key is another's sub-key, and no sub-key is a session key.
    for sid in (first, uuid.uuid4().hex, "a.b-c_D"):
        validate.session_id(sid)
        assert ":" not in sid
    session.close()
    assert not client.redis.exists(recipes_key)


def raw_app(client: Client) -> Celery:
    """Plain Celery: the message exactly as written here, past every producer check."""
    app = Celery("raw", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env(), client.redis_url))
    return app


def test_a_raw_call_with_an_int_session_id_is_a_typed_error_and_the_worker_keeps_beating(
    client: Client, sessions: Callable[..., Session]
) -> None:
    digits = str(10**11 + uuid.uuid4().int % (9 * 10**11))  # a live string session whose id an int can spell
    session = sessions("triage_pool", session_id=digits)
    node = session.worker
    assert node is not None and session.call("ping", timeout=10)["seq"] == 1
    app = raw_app(client)
    route = {"node": node, "affinity": "strict_queue", "incarnation": session.incarnation}
    sent_at = time.time()
    raw = app.send_task(names.CALL_TASK, args=[int(digits), "ping", {}, route], queue=names.worker_queue(node))
    with pytest.raises((InvalidArgument, DeadLettered)):  # refused by the allow-list, or by the poison guard first
        raw.get(timeout=deadline_s, disable_sync_subtasks=False)
    # Housekeeping ran at least twice since, and the heartbeat still renews the worker's liveness.
    wait_until(lambda: next(w for w in client.registry.workers(["triage_pool"]) if w.node == node).last_beat
               > sent_at + 2 * housekeeping_interval_s + 0.5, timeout_s=30, what="heartbeats after housekeeping")
    assert client.registry.liveness([node])[node].live
    assert session.call("ping", timeout=10)["seq"] == 2  # the string session was not touched
    app.close()


@pytest.mark.parametrize(("session_id", "op", "kwargs", "route_extra"), [
    ("K:recipes", "ping", {}, {}),
    ("ok", "ping", {"sleep_s": "long"}, {}),
    ("ok", "ping", {}, {"ttl_s": 1e30}),
    ("ok", "call", {"ref": "?", "inputs": {"ticket": "x"}}, {}),
    ("ok", "call", {"ref": "module", "inputs": {"ticket": OVER}}, {}),
    ("ok", "context", {"text": 5}, {}),
    ("ok", "history", {"n": "all"}, {}),
], ids=["session id K:recipes", "ping sleep_s='long'", "route ttl_s=1e30", "ref '?'",
        "Predict input 1 byte over 1 MiB", "context text=5", "history n='all'"])
def test_the_worker_is_the_authority_for_raw_messages_that_skip_the_producer(
    client: Client, doors: Doors, session_id: str, op: str, kwargs: dict[str, Any], route_extra: dict[str, Any]
) -> None:
    node = doors.session.worker
    assert node is not None
    sid = doors.session.id if session_id == "ok" else session_id
    if kwargs.get("ref") == "module":
        kwargs = {**kwargs, "ref": doors.module.ref_id}
    route = {"node": node, "affinity": "strict_queue", "incarnation": doors.session.incarnation, **route_extra}
    app = raw_app(client)
    started = time.monotonic()
    raw = app.send_task(names.CALL_TASK, args=[sid, op, kwargs, route], queue=names.worker_queue(node))
    with pytest.raises(InvalidArgument):
        raw.get(timeout=deadline_s, disable_sync_subtasks=False)
    assert time.monotonic() - started < deadline_s
    assert doors.module(ticket="still serving", timeout=30)["category"]
    app.close()


def test_the_worker_book_and_allow_list_refuse_ids_and_ttls_a_raw_message_could_carry(client: Client) -> None:
    """Behind the poison guard, the worker's own bookkeeping refuses what would break housekeeping."""
    from tasks.ops import session as session_ops  # registers release_session
    from tasks.worker.allowlist import CallContext, dispatch
    from tasks.worker.session_book import SessionBook

    assert session_ops.release_session

    book = SessionBook(client.sessions, 60.0)
    for sid, ttl_s in ((5, 60.0), ("K:recipes", 60.0), (["a"], 60.0), ("ok", 1e30), ("ok", -1.0), ("ok", math.nan)):
        with pytest.raises(InvalidArgument):
            book.ensure(sid, ttl_s)  # type: ignore[arg-type]
    assert book.sessions() == set() and book.take_touched() == {}  # nothing noted: housekeeping sorts only strings
    for sid in (5, None, "a:b"):
        with pytest.raises(InvalidArgument):
            dispatch(CallContext(sid, None), "release_session", {})  # type: ignore[arg-type]
