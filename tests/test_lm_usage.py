"""The usage ledger and budgets: per session, run, pool and model, from what the provider reported.

Real workers against a local OpenAI-protocol server that adds up the usage it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fake_openai import FakeOpenAI

from routing import Client, Session
from routing.errors import BudgetExceeded, InvalidArgument
from routing.fleet import usage
from tasks.local.metrics import lm_families
from tasks.local.stack import Stack, WorkerProcess

POOL = "lm_gov_pool"
MODEL = "openai/usage-model"
SIGNATURE = "ticket -> category"


@pytest.fixture(scope="module")
def workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    started = [stack.start_worker(POOL, wait=False, env={"FLAGSHIP_LM_CACHE": "off"}) for _ in range(2)]
    stack.wait_ready(started)
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _tickets(n: int, tag: str) -> list[dict[str, str]]:
    return [{"ticket": f"{tag} {i}: the invoice shows the wrong VAT rate"} for i in range(n)]


def test_session_usage_equals_the_tokens_the_server_reported(
    workers: list[WorkerProcess], client: Client, sessions: Callable[..., Session], server: FakeOpenAI
) -> None:
    before_pool = client.usage(pool=POOL, model=MODEL)
    session = sessions(POOL)
    module = session.predict(SIGNATURE, lm=session.lm("usage-model", api_base=server.base_url))
    module.batch(_tickets(20, "usage"), num_threads=4)
    module(ticket="one more, alone")
    found = session.usage()
    assert {k: found[k] for k in usage.USAGE_FIELDS} == {
        "calls": 21, "prompt_tokens": server.prompt_tokens, "completion_tokens": server.completion_tokens,
        "cost_usd": 0.0, "cache_hits": 0}
    assert found["budget"] == {"tokens": None, "usd": None}
    assert found["spent"]["tokens"] == server.prompt_tokens + server.completion_tokens
    pool = client.usage(pool=POOL, model=MODEL)
    assert set(pool) == set(usage.USAGE_FIELDS)
    assert pool["calls"] - before_pool["calls"] == 21
    assert pool["prompt_tokens"] - before_pool["prompt_tokens"] == server.prompt_tokens
    assert client.usage()["calls"] >= pool["calls"]
    assert client.usage(model="openai/no-such-model")["calls"] == 0
    families = {f.name: f for f in lm_families(usage.pool_rows(client.redis))}
    [prompt] = [s.value for s in families["flagship_lm_tokens"].samples
                if s.labels == {"pool": POOL, "model": MODEL, "kind": "prompt"} and s.name.endswith("_total")]
    assert prompt == pool["prompt_tokens"]


def test_a_token_budget_stops_a_session_before_the_provider_with_overshoot_at_most_the_calls_in_flight(
    workers: list[WorkerProcess], sessions: Callable[..., Session], server: FakeOpenAI
) -> None:
    probe = sessions(POOL)
    probe.predict(SIGNATURE, lm=probe.lm("usage-model", api_base=server.base_url))(ticket="probe 0: refund me")
    per_call = probe.usage()["spent"]["tokens"]
    budget = 5 * per_call + per_call // 2
    session = sessions(POOL, budget_tokens=budget)
    module = session.predict(SIGNATURE, lm=session.lm("usage-model", api_base=server.base_url))
    done = 0
    with pytest.raises(BudgetExceeded) as refused:
        for ticket in _tickets(20, "budget"):  # one at a time: one call in flight
            module(ticket=ticket["ticket"])
            done += 1
    assert done == 6 and refused.value.scope == f"session {session.id}"
    served = server.served
    with pytest.raises(BudgetExceeded):
        module(ticket="and another")
    assert server.served == served  # refused before the provider
    found = session.usage()
    assert found["budget"] == {"tokens": budget, "usd": None}
    assert budget <= found["spent"]["tokens"] <= budget + 1.2 * per_call

    parallel = sessions(POOL, budget_tokens=budget)
    batched = parallel.predict(SIGNATURE, lm=parallel.lm("usage-model", api_base=server.base_url))
    outcomes = batched.batch(_tickets(40, "parallel"), num_threads=4, return_exceptions=True)
    refused_items = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert refused_items and len(refused_items) + sum(not isinstance(o, Exception) for o in outcomes) == 40
    assert parallel.usage()["spent"]["tokens"] <= budget + 4 * 1.2 * per_call  # at most the 4 in flight over


def test_map_carries_its_runs_usage_and_budget(
    workers: list[WorkerProcess], client: Client, server: FakeOpenAI
) -> None:
    lm = {"model": "usage-model", "api_base": server.base_url}
    result = client.map(POOL, SIGNATURE, _tickets(30, "map"), lm=lm)
    assert result.usage["calls"] == 30 and result.usage["prompt_tokens"] > 0
    assert result.summary()["usage"] == result.usage
    per_call = (result.usage["prompt_tokens"] + result.usage["completion_tokens"]) / 30
    budget = int(10 * per_call)
    limited = client.map(POOL, SIGNATURE, _tickets(60, "map-budget"), lm=lm, budget_tokens=budget)
    assert limited.failures.get("BudgetExceeded", 0) > 0
    spent = limited.usage["prompt_tokens"] + limited.usage["completion_tokens"]
    in_flight = 2 * 8  # two workers of 8 threads
    assert budget <= spent <= budget + in_flight * 1.2 * per_call
    assert limited.usage["calls"] == 60 - limited.failures["BudgetExceeded"]


def test_budgets_are_checked_at_the_door(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="budget_tokens"):
        client.session(POOL, budget_tokens=0)
    with pytest.raises(InvalidArgument, match="budget_usd"):
        client.session(POOL, budget_usd="ten")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="budget_tokens"):
        client.map(POOL, SIGNATURE, [{"ticket": "x"}], budget_tokens=1.5)  # type: ignore[arg-type]
