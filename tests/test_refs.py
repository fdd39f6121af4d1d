"""Stateful DSPy refs on real workers: reuse, isolation, release, history, real HTTP LMs, rehydration."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fake_openai import FakeOpenAI
from helpers import wait_until

from routing import Client, Session, names
from routing.errors import (
    InvalidSignature,
    LMAuthError,
    RefEvicted,
    RefNotFound,
    RefSessionMismatch,
    SessionWorkerUnavailable,
)
from tasks.local.stack import Stack, WorkerProcess

TRIAGE = "ticket -> category, urgency, action"
TICKETS = {
    "outage": "Checkout API returns 502 for all customers since 09:00; the site is down.",
    "billing": "I was charged twice on my last invoice, please refund one charge.",
    "account": "Locked out after the 2FA reset, the password link never arrives.",
}


def worker_refs(client: Client, node: str) -> int:
    return int(client.redis.hget(names.worker_key(node), "refs") or 0)


def test_a_predictor_is_created_once_and_reused_on_the_same_worker(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    pid = session.call("ping")["pid"]
    lm = session.lm(temperature=0.2)
    triage = session.predict(TRIAGE, lm=lm)
    answers = [triage(ticket=text) for text in TICKETS.values()]
    assert [a["category"] for a in answers] == list(TICKETS)
    assert {r.ref_id for r in session.refs()} == {lm.ref_id, triage.ref_id}
    assert triage.handle.worker == session.worker and session.call("ping")["pid"] == pid
    assert lm.offline and "[offline]" in answers[0]["action"]


def test_chain_of_thought_returns_reasoning_and_json_field_specs_keep_their_choices(
    sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    spec = {"inputs": {"ticket": {"desc": "support ticket text"}},
            "outputs": {"category": {"type": "literal", "choices": ["outage", "billing", "feature", "account", "bug"]},
                        "urgency": {"type": "literal", "choices": ["high", "medium", "low"]}}}
    cot = session.chain_of_thought(spec)
    out = cot(ticket=TICKETS["billing"])
    assert (out["category"], out["urgency"]) == ("billing", "medium")
    assert out["reasoning"]


def test_wrong_refs_and_bad_signatures_are_typed_and_the_worker_keeps_serving(
    sessions: Callable[..., Session]
) -> None:
    owner = sessions("triage_pool")
    triage = owner.predict(TRIAGE)
    intruder = sessions("triage_pool", node=owner.worker)
    with pytest.raises(RefSessionMismatch) as mismatch:
        intruder.call("call", ref=triage.ref_id, inputs={"ticket": "x"})
    assert (mismatch.value.owner_session_id, mismatch.value.session_id) == (owner.id, intruder.id)
    with pytest.raises(RefNotFound):
        owner.call("call", ref="predict-doesnotexist", inputs={"ticket": "x"})
    for bad in ("ticket -> ", "ticket: __import__('os') -> answer", "a -> b -> c", {"inputs": {}}):
        with pytest.raises(InvalidSignature):
            owner.predict(bad)  # type: ignore[arg-type]
    assert triage(ticket=TICKETS["outage"])["category"] == "outage"


def test_released_refs_and_closed_sessions_free_their_objects(
    client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    (worker,) = pool_workers("small_pool", 1)  # its own worker: no other test's refs in the count
    session = sessions("small_pool")
    node = session.worker
    assert node == worker.node and worker_refs(client, node) == 0
    modules = [session.predict(TRIAGE) for _ in range(3)]
    wait_until(lambda: worker_refs(client, node) == 3, what="refs counted in status")
    modules[0].release()
    with pytest.raises(RefNotFound):
        modules[0](ticket="x")
    wait_until(lambda: worker_refs(client, node) == 2, what="released ref freed")
    session.close()
    wait_until(lambda: worker_refs(client, node) == 0, what="closed session freed")


def test_expired_sessions_are_swept_from_worker_memory(
    client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    pool_workers("small_pool", 1)
    session = sessions("small_pool", ttl_s=3.0)
    node = session.worker
    session.predict(TRIAGE)
    wait_until(lambda: worker_refs(client, node) == 1, what="ref counted")
    wait_until(lambda: worker_refs(client, node) == 0, timeout_s=15, what="idle session swept")
    assert not client.redis.exists(names.session_key(session.id))


def test_history_of_a_session_holds_only_its_own_prompts(sessions: Callable[..., Session]) -> None:
    a = sessions("triage_pool")
    b = sessions("triage_pool", node=a.worker)
    pa, pb = a.predict(TRIAGE), b.predict(TRIAGE)
    a_tickets = [f"A-{i}: the API is down for region {i}" for i in range(3)]
    b_tickets = [f"B-{i}: charged twice on invoice {i}" for i in range(2)]
    for text in a_tickets:
        pa(ticket=text)
    for text in b_tickets:
        pb(ticket=text)
    history = a.history(n=10)
    prompts = [e["messages"][-1]["content"] for e in history]
    assert len(prompts) == 3 and history.complete
    assert all(t in p for t, p in zip(a_tickets, prompts))
    assert not any("B-" in p for p in prompts)
    assert all(e["offline"] and e["usage"]["total_tokens"] > 0 for e in history)
    assert len(b.history(n=10)) == 2


def test_real_dspy_lm_over_http_retries_rate_limits_and_types_auth_errors(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    with FakeOpenAI() as server:
        lm = session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test", temperature=0.2)
        assert not lm.offline
        triage = session.predict(TRIAGE, lm=lm)
        server.fail(429, times=2)
        answer = triage(ticket=TICKETS["outage"])
        assert answer["category"] == "outage"
        assert len(server.requests) == 3
        assert server.requests[-1].headers["authorization"] == "Bearer sk-test"
        entry = session.history(lm=lm, n=1)[-1]
        assert entry["model"] == "openai/fake-model" and entry["usage"]["total_tokens"] > 0
        server.always(401)
        before = len(server.requests)
        with pytest.raises(LMAuthError):
            triage(ticket=TICKETS["billing"])
        assert len(server.requests) == before + 1
    assert session.call("ping")["node"] == session.worker


def test_refs_past_the_worker_cap_are_evicted_with_a_clear_error(
    sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    pool_workers("small_pool", 1, env={"FLAGSHIP_MAX_REFS": "3"})
    session = sessions("small_pool")
    first, *rest = [session.predict(TRIAGE) for _ in range(4)]
    with pytest.raises(RefEvicted):
        first(ticket="x")
    assert rest[-1](ticket=TICKETS["billing"])["category"] == "billing"


def test_rehydrate_rebuilds_refs_on_a_live_worker_after_kill_9(
    client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    session = sessions("kill_pool")
    lm = session.lm(temperature=0.2)
    triage = session.predict(TRIAGE, lm=lm)
    before = triage(ticket=TICKETS["account"])
    dead = session.worker
    workers[dead].kill()
    wait_until(lambda: not client.watch.get(dead).live, what="death noticed")
    with pytest.raises(SessionWorkerUnavailable):
        triage(ticket=TICKETS["account"])
    after = session.call("call", ref=triage.ref_id, inputs={"ticket": TICKETS["account"]}, rehydrate=True)
    assert after["outputs"] == before and after["worker"] != dead
    assert session.worker == after["worker"] and session.rehydrations == 1
    assert triage(ticket=TICKETS["outage"])["category"] == "outage"
    history = session.history(n=10)
    assert not history.complete and "rebuilt" in history.note
    assert len(history) == 2  # only the calls made since the rebuild


def test_a_session_opened_with_rehydrate_survives_its_worker_dying_mid_call(
    client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    session = sessions("kill_pool", rehydrate=True)
    triage = session.predict(TRIAGE)
    dead = session.worker
    waiting = session.submit("ping", sleep_s=5.0)
    wait_until(lambda: client.registry.liveness([dead])[dead].in_flight >= 1, what="call running")
    workers[dead].kill()
    result = waiting.result(30)
    assert result["node"] != dead and session.worker == result["node"] == waiting.node
    assert triage(ticket=TICKETS["billing"])["category"] == "billing"


def test_api_keys_are_masked_in_what_celery_shows_and_never_stored_in_recipes(
    client: Client, sessions: Callable[..., Session]
) -> None:
    from routing.producer.binding import redacted_argsrepr as _redacted_repr

    shown = _redacted_repr(["s", "lm", {"model": "m", "api_key": "sk-secret"}, {}])
    assert shown is not None and "sk-secret" not in shown and "***" in shown
    assert _redacted_repr(["s", "call", {"ref": "predict-1", "inputs": {"x": 1, "api_key": "sk-secret"}},
                           {"pool": "triage_pool"}]) == ("pool=triage_pool ref=predict-1 session=s "
                                                         "inputs={'api_key': '***', 'x': 1}")
    session = sessions("triage_pool")
    with FakeOpenAI() as server:
        session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-secret")
    assert "sk-secret" not in str(client.redis.hgetall(names.session_recipes_key(session.id)))


def test_producers_cannot_point_lms_at_servers_the_workers_do_not_allow(sessions: Callable[..., Session]) -> None:
    from routing.errors import InvalidArgument

    session = sessions("triage_pool")
    for forged in ("http://169.254.169.254/latest/", "http://127.0.0.1:@169.254.169.254/latest/",
                   "http://127.0.0.1.evil.example/v1", "http://user:pw@127.0.0.1:9/v1"):
        with pytest.raises(InvalidArgument, match="FLAGSHIP_LM_API_BASES"):
            session.lm("openai/x", api_base=forged)
    assert session.call("ping")["node"] == session.worker


def test_a_one_worker_pool_rehydrates_onto_the_restarted_worker(
    stack: Stack, client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]]
) -> None:
    (worker,) = pool_workers("late_pool", 1)
    session = sessions("late_pool")
    triage = session.predict(TRIAGE, lm=session.lm(temperature=0.2))
    before = triage(ticket=TICKETS["outage"])
    worker.kill()
    reborn = stack.start_worker("late_pool", worker.node)  # same name, new run, empty memory
    try:
        with pytest.raises(SessionWorkerUnavailable):
            triage(ticket=TICKETS["outage"])
        after = session.call("call", ref=triage.ref_id, inputs={"ticket": TICKETS["outage"]}, rehydrate=True)
        assert after["outputs"] == before and after["worker"] == worker.node
        assert session.call("ping")["pid"] == reborn.pid and session.rehydrations == 1
    finally:
        reborn.stop()
