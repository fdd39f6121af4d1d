"""Big arguments by reference (claim-check) and context refs, on real workers and a real Valkey server.

Correctness, not speed: a big argument arrives whole, its claim key exists while the
call waits and is gone once the call ran (value or typed error), it survives a
``kill -9`` of the worker holding the call and a rehydration, and a context ref
held by a session works after its worker died and the session was rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
from celery import Celery
from helpers import wait_until

from routing import Client, Session, Settings, names, validate
from routing.broker import claims
from routing.broker.celery_config import celery_config
from routing.errors import InvalidArgument, RefNotFound
from routing.producer.handles import ContextRef
from tasks.local.stack import WorkerProcess

StartWorkers = Callable[..., list[WorkerProcess]]


def big_text(chars: int = 200_000, tail: str = "") -> str:
    """Filler lines, then ``tail``: only a text that arrived whole ends with it."""
    line = "2026-01-01T00:00:00Z svc=api level=info msg=request served in 12 ms\n"
    return (line * (chars // len(line) + 1))[:chars] + tail


def claim_keys(client: Client, session: Session) -> list[str]:
    return sorted(client.redis.scan_iter(match=names.claim_key(session.id, "*")))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_only_values_that_can_be_big_are_measured_and_small_calls_store_nothing(client: Client) -> None:
    assert validate.json_size("abc", 100) == 5
    accented = "é" * 30
    assert validate.json_size(accented, 1000) == len(json.dumps(accented))  # as kombu's JSON encodes it
    assert validate.json_size(["x" * 50] * 10_000, 1000) < 2000  # counting stops past the limit
    assert validate.json_size({"ticket": "short", "n": 3}, 100) < 100
    handle = ContextRef("context-abc", "s", "w", "context")
    assert validate.json_size({"context": handle}, 100) < 100
    small = {"ticket": "short", "inputs": {"a": [1, 2, 3]}}
    kept = claims.offload(client.redis, "s-small", "call", small, 64 * 1024, 60)
    assert kept.kwargs is small and kept.claims == {}
    assert not list(client.redis.scan_iter(match=names.claim_key("s-small", "*")))
    off = claims.offload(client.redis, "s-off", "call", {"data": big_text()}, 0, 60)  # 0: claim-check off
    assert off.claims == {}


def test_a_big_argument_goes_by_reference_arrives_whole_and_its_key_is_deleted_after_the_call(
    client: Client, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    text = big_text(tail="END")
    busy = session.submit("ping", sleep_s=1.0)
    big = session.submit("payload_size", data=text, digest=True)
    keys = claim_keys(client, session)
    assert len(keys) == 1  # stored once, while the call waits for its turn
    assert client.redis.strlen(keys[0]) >= len(text)
    assert client.redis.pttl(keys[0]) > 3_500_000  # the session's TTL, at least an hour
    assert busy.result(15)["seq"] == 1
    reply = big.result(15)
    assert (reply["size"], reply["sha256"]) == (len(text), sha256(text))
    assert claim_keys(client, session) == []

    listed = [{"i": i, "line": "x" * 100} for i in range(2000)]  # lists and dicts go by reference too
    assert session.call("payload_size", data=listed, timeout_s=15)["size"] == 2000
    assert claim_keys(client, session) == []

    with pytest.raises(InvalidArgument):  # a typed failure deletes its claims too
        session.call("payload_size", data=text, bogus=1, timeout_s=15)
    assert claim_keys(client, session) == []


def test_a_route_naming_a_malformed_or_missing_claim_is_a_typed_error(
    client: Client, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    app = Celery("plain", set_as_current=False)  # plain Celery: the message exactly as written here
    app.conf.update(celery_config(Settings.from_env(), client.redis_url))
    route = {"node": session.worker, "affinity": "strict_queue", "incarnation": session.incarnation}
    for bad, error in (("../etc", "claim ids"), ("0" * 32, "stored copy is gone")):
        sent = app.send_task(names.CALL_TASK, queue=names.worker_queue(session.worker or ""),
                                    args=[session.id, "payload_size", {}, {**route, "claims": {"data": bad}}])
        with pytest.raises(InvalidArgument) as raised:
            sent.get(timeout=15, disable_sync_subtasks=False)
        assert error in str(raised.value)
    app.close()


def test_claims_survive_kill_9_and_the_redelivered_call_uses_then_deletes_them(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("hint_kill_pool", 2)}
    hinted = sessions("hint_kill_pool")
    dead = hinted.worker
    assert dead is not None
    text = big_text(tail="END")
    hinted.submit("ping", sleep_s=2.0)
    big = hinted.submit("payload_size", data=text, digest=True)  # received by the worker, waiting for its turn
    wait_until(lambda: client.registry.liveness([dead])[dead].in_flight >= 2, what="both calls received")
    assert len(claim_keys(client, hinted)) == 1
    workers[dead].kill()
    reply = big.result(30)
    assert reply["node"] != dead
    assert (reply["size"], reply["sha256"]) == (len(text), sha256(text))
    wait_until(lambda: not claim_keys(client, hinted), what="claims deleted after the redelivered call")


def test_a_context_ref_and_a_waiting_claim_work_after_kill_9_and_rehydration(
    client: Client, sessions: Callable[..., Session], pool_workers: StartWorkers
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    session = sessions("kill_pool", rehydrate=True)
    first = session.worker
    assert first is not None
    triage = session.predict("ticket -> category, urgency, action")
    text = big_text(tail="\nplease add export to csv, no rush")  # the verdict is in the last line
    ctx = session.context(text)
    assert (ctx.kind, ctx.chars) == ("context", len(text))
    assert claim_keys(client, session) == []  # the text went by reference; its claim is gone
    contexts = names.session_contexts_key(session.id)
    assert client.redis.hget(contexts, ctx.ref_id) == text
    recipe = json.loads(client.redis.hget(names.session_recipes_key(session.id), ctx.ref_id))
    assert recipe["op"] == "context" and recipe["kwargs"] == {}  # the recipe names the stored copy, no text
    before = triage(ticket=ctx, timeout_s=30)
    assert (before["category"], before["urgency"]) == ("feature", "low")

    session.submit("ping", sleep_s=2.0)
    waiting = session.submit("payload_size", data=text, digest=True)
    wait_until(lambda: client.registry.liveness([first])[first].in_flight >= 2, what="both calls received")
    assert len(claim_keys(client, session)) == 1
    workers[first].kill()
    reply = waiting.result(60)  # rehydrated on the other worker, then sent again
    assert reply["node"] != first and reply["sha256"] == sha256(text)
    assert session.worker != first and session.rehydrations == 1

    after = triage(ticket=ctx, timeout_s=30)  # the context was rebuilt from its stored copy
    assert (after["category"], after["urgency"]) == ("feature", "low")
    assert ctx.ref_id in [r.ref_id for r in session.refs()]
    # The dead worker's copy of the call is moved, refused (its state died) and its claim deleted.
    wait_until(lambda: not claim_keys(client, session), timeout_s=20, what="every claim deleted")

    session.close()
    assert not client.redis.exists(contexts)


def test_a_context_ref_is_refused_where_a_module_is_due_and_a_missing_copy_is_a_typed_error(
    sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    ctx = session.context("short log")
    with pytest.raises(InvalidArgument):
        session.call("call", ref=ctx.ref_id, inputs={}, timeout_s=15)
    with pytest.raises(RefNotFound):
        session.call("context", ref_id="context-nothere", timeout_s=15)
