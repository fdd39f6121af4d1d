"""The fleet LM cache: one cache for every worker of the broker, single-flight, TTL, an LRU size cap of its own.

Real workers (each with its own DSPy cache directory, as on two machines) against a
local OpenAI-protocol server that counts the requests it serves.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from redis import Redis

from routing import Client, Session, Settings, names
from tasks.lm.fleet_cache import BYTES_KEY, LRU_KEY, FleetTier, Flight, flight_var
from tasks.local.stack import Stack, WorkerProcess

POOL = "lm_gov_pool"
SIGNATURE = "ticket -> category"
PROMPTS = [f"Ticket {i}: checkout returns 502 for customer {i}" for i in range(100)]


def start_workers(stack: Stack, tmp_path: Path, tag: str) -> list[WorkerProcess]:
    workers = [stack.start_worker(POOL, wait=False, env={"FLAGSHIP_LM_CACHE": "fleet",
                                                         "DSPY_CACHEDIR": str(tmp_path / f"{tag}-dspy-{i}")})
               for i in range(2)]
    stack.wait_ready(workers)
    return workers


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(delay_s=0.02) as fake:
        yield fake


def _flush_cache(redis: Redis) -> None:
    keys = list(redis.scan_iter("flagship:lmcache:*", count=1000))
    if keys:
        redis.delete(*keys)


def _run_sessions(client: Client, server: FakeOpenAI, temperature: float | None = None,
                  count: int = 10) -> list[Session]:
    """``count`` sessions, each 100 predictions over the 100 prompts (8 at once per session): 1,000 calls."""
    opened = [client.session(POOL) for _ in range(count)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            session = opened[i]
            lm = session.lm("fake-model", api_base=server.base_url, temperature=temperature)
            order = PROMPTS[i * 10:] + PROMPTS[:i * 10]  # sessions start at different prompts, then overlap
            outputs = session.predict(SIGNATURE, lm=lm).batch([{"ticket": t} for t in order], num_threads=8,
                                                               timeout_s=120)
            assert len(outputs) == 100 and all(o["category"] for o in outputs)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    return opened


def test_a_thousand_calls_over_a_hundred_prompts_reach_the_server_a_hundred_times_and_survive_the_workers(
    stack: Stack, client: Client, server: FakeOpenAI, tmp_path: Path
) -> None:
    _flush_cache(client.redis)
    workers = start_workers(stack, tmp_path, "first")
    try:
        before = server.served
        opened = _run_sessions(client, server)
        assert len({s.worker for s in opened}) == 2  # both workers served sessions
        assert server.served - before == 100
        hits = [e for s in opened for e in s.history(n=100)]
        assert sum(e["cache_hit"] for e in hits) == 900
        assert all(e["cost"] == 0 and not e["usage"]["total_tokens"] for e in hits if e["cache_hit"])
        for s in opened:
            s.close()
    finally:
        for w in workers:
            w.kill()
    workers = start_workers(stack, tmp_path, "second")  # new processes, new DSPy cache directories
    try:
        before = server.served
        for s in _run_sessions(client, server):
            s.close()
        assert server.served - before == 0
        before = server.served
        for s in _run_sessions(client, server, temperature=0.7, count=2):  # another parameter: another request
            s.close()
        assert server.served - before == 100
        assert {r.body.get("temperature") for r in server.requests[-100:]} == {0.7}
    finally:
        for w in workers:
            w.stop()


@pytest.fixture
def tier(stack: Stack) -> Iterator[tuple[FleetTier, Redis]]:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    _flush_cache(redis)
    yield FleetTier(redis, ttl_s=60, max_bytes=20_000, lease_s=5), redis
    _flush_cache(redis)
    redis.close()


def _record(text: str) -> dict[str, object]:
    return {"_dspy_format": "dspy-lm15-result-v1", "responses": [], "outputs": [text], "usage": {}, "cost": None,
            "cost_details": {}, "raw": {"choices": [{"message": {"content": text}}]}, "response_model": "m"}


def test_concurrent_identical_requests_wait_for_the_first_ones_answer(tier: tuple[FleetTier, Redis]) -> None:
    cache, _ = tier
    leader = Flight(deadline=None)
    token = flight_var.set(leader)
    assert cache.get("k1") is None and "k1" in leader.held  # a miss: this request leads
    flight_var.reset(token)
    answers: list[object] = []

    def waiter() -> None:
        flight_var.set(Flight(deadline=None))
        answers.append(cache.get("k1"))

    threads = [threading.Thread(target=waiter) for _ in range(5)]
    for t in threads:
        t.start()
    threading.Event().wait(0.3)  # the waiters are blocked on the flight (none got an answer yet)
    assert answers == []
    token = flight_var.set(leader)
    cache.set("k1", _record("the answer"))
    flight_var.reset(token)
    for t in threads:
        t.join(5)
    assert [a["outputs"] for a in answers] == [["the answer"]] * 5  # type: ignore[index]


def test_a_failed_leader_hands_the_request_to_one_waiter(tier: tuple[FleetTier, Redis]) -> None:
    cache, _ = tier
    leader, follower = Flight(deadline=None), Flight(deadline=None)
    token = flight_var.set(leader)
    assert cache.get("k2") is None
    flight_var.reset(token)
    result: list[object] = []

    def wait() -> None:
        flight_var.set(follower)
        result.append(cache.get("k2"))

    t = threading.Thread(target=wait)
    t.start()
    threading.Event().wait(0.2)
    cache.end_flights(leader)  # the provider call failed: nothing stored
    t.join(5)
    assert result == [None] and "k2" in follower.held  # the waiter leads the next try


def test_the_cache_keeps_its_size_cap_by_lru_and_never_evicts_a_queue_or_a_session_key(
    tier: tuple[FleetTier, Redis], sessions: Callable[..., Session]
) -> None:
    cache, redis = tier
    session = sessions("triage_pool")
    redis.rpush(names.pool_queue("lm_gov_pool") + ".probe", "a queued call")
    body = "x" * 1500
    for i in range(40):  # ~68 KB offered to a 20 KB cache
        cache.set(f"e{i}", _record(f"{i}{body}"))
        if i >= 1:
            assert cache.get("e0") is not None  # read after every write: the most recently used survives
    assert int(redis.get(BYTES_KEY) or 0) <= 20_000
    kept = redis.zrange(LRU_KEY, 0, -1)
    assert 5 <= len(kept) <= 13 and "flagship:lmcache:v:e0" in kept and "flagship:lmcache:v:e1" not in kept
    assert cache.get("e39") is not None and cache.get("e2") is None
    assert redis.exists(names.session_key(session.id)) and redis.llen(names.pool_queue("lm_gov_pool") + ".probe")
    assert session.call("ping")["node"] == session.worker
    redis.delete(names.pool_queue("lm_gov_pool") + ".probe")


def test_only_successful_plain_json_records_are_stored(tier: tuple[FleetTier, Redis]) -> None:
    cache, redis = tier
    assert cache.set("ok", _record("fine"))
    assert not cache.set("empty", {**_record("x"), "outputs": []})
    assert not cache.set("sdk", object())
    assert not cache.set("not-json", {**_record("x"), "raw": {1, 2}})
    assert json.loads(redis.get("flagship:lmcache:v:ok"))["outputs"] == ["fine"]
    assert not redis.exists("flagship:lmcache:v:empty") and not redis.exists("flagship:lmcache:v:sdk")


def test_settings_name_the_cache_modes() -> None:
    from tasks.lm.governance import GovernorSettings

    assert GovernorSettings.from_env({}).cache == "fleet"
    assert GovernorSettings.from_env({"FLAGSHIP_LM_CACHE": "1"}).cache == "local"
    assert GovernorSettings.from_env({"FLAGSHIP_LM_CACHE": "off"}).cache == "off"
    with pytest.raises(ValueError, match="FLAGSHIP_LM_CACHE"):
        GovernorSettings.from_env({"FLAGSHIP_LM_CACHE": "redis"})
    assert Settings.from_env() is not None
