"""DSPy's per-call lookups, cached: the same answers, the same history costs, no repeated work."""

from __future__ import annotations

import urllib.request

import dspy
from dspy.adapters import utils as adapter_utils
from dspy.clients import costs as dspy_costs
from dspy.clients import model_metadata
from pydantic import BaseModel, TypeAdapter

from tasks.bench.helpers.fake_lm_server import FakeOpenAI
from tasks.lm import dspy_caches as caches
from tasks.lm.history import history_entries
from tasks.lm.provider import LMSettings, build_lm


def test_cached_lookup_answers_like_dspy_and_hands_out_copies() -> None:
    caches.install_dspy_caches()
    caches.install_dspy_caches()  # idempotent
    assert dspy_costs.model_info is caches.cached_model_info
    original = caches._original_model_info
    assert original is model_metadata.model_info
    for provider, model, namespaces in [("openai", "gpt-4o-mini", None), ("openai", "no-such-model-xyz", None),
                                        ("openai", "gpt-4o-mini", ("openai",)), ("openai", "gpt-4o-mini", ())]:
        assert caches.cached_model_info(provider, model, namespaces=namespaces) == \
            original(provider, model, namespaces=namespaces)
    first = caches.cached_model_info("openai", "gpt-4o-mini")
    assert first and first.get("input_cost_per_token")
    first["input_cost_per_token"] = 123.0
    assert caches.cached_model_info("openai", "gpt-4o-mini")["input_cost_per_token"] != 123.0


def test_unknown_model_is_looked_up_once() -> None:
    caches.install_dspy_caches()
    before = caches._model_info.cache_info().misses
    for _ in range(50):
        assert caches.cached_model_info("openai", "local-model-cache-test") == {}
    assert caches._model_info.cache_info().misses == before + 1


def test_history_cost_stays_a_number_for_priced_models_and_none_for_unknown_ones() -> None:
    with FakeOpenAI() as server:
        priced = build_lm("gpt-4o-mini", settings=LMSettings(model="openai/x", api_base=server.base_url, retries=0))
        unknown = build_lm("local-model", settings=LMSettings(model="openai/x", api_base=server.base_url, retries=0))
        for lm in (priced, unknown):
            with dspy.context(lm=lm):
                for _ in range(2):
                    dspy.Predict("ticket -> category")(ticket="Checkout returns 502 for all customers")
    assert dspy_costs.model_info is caches.cached_model_info  # built LMs install the cache
    [*_, last_priced] = history_entries(priced)
    [*_, last_unknown] = history_entries(unknown)
    assert last_priced["cost"] is not None and last_priced["cost"] > 0
    assert last_unknown["cost"] is None


class Ticket(BaseModel):
    text: str
    tags: list[str]


def test_type_adapters_are_built_once_per_type_and_serialize_like_new_ones() -> None:
    caches.install_dspy_caches()
    assert adapter_utils.TypeAdapter is caches.cached_type_adapter
    assert caches.cached_type_adapter(Ticket) is caches.cached_type_adapter(Ticket)
    assert caches.cached_type_adapter(list[int]) is caches.cached_type_adapter(list[int])
    value = Ticket(text="502 at checkout", tags=["outage"])
    for item in (value, [value], {"a": 1}, "text", 3.5, None):
        assert adapter_utils.serialize_for_json(item) == \
            TypeAdapter(type(item)).dump_python(item, mode="json", fallback=str)
    assert adapter_utils.parse_value("7", int) == 7 and adapter_utils.parse_value('["a"]', list[str]) == ["a"]


def test_a_worker_keeps_the_proxy_settings_it_started_with(monkeypatch) -> None:
    from dspy._vendor.lm15.transports import _proxy

    monkeypatch.setattr(_proxy, "getproxies", urllib.request.getproxies)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    caches.freeze_proxy_environment()
    monkeypatch.delenv("HTTPS_PROXY")
    assert _proxy.getproxies()["https"] == "http://proxy.example:3128"
    assert _proxy.getproxies() is not _proxy.getproxies()  # callers get their own dict


def test_pricing_route_is_resolved_once_per_model_and_matches_dspy() -> None:
    from dspy.clients import capabilities

    caches.install_dspy_caches()
    assert capabilities.resolve is caches.cached_route
    assert caches._original_route is not None
    lm = build_lm("local-model-route-test", settings=LMSettings(model="openai/x", api_base="http://127.0.0.1:9/v1"))
    before = caches._route.cache_info().misses
    routes = [capabilities.resolve(lm) for _ in range(20)]
    assert caches._route.cache_info().misses == before + 1
    assert routes[0] == caches._original_route(lm) and routes[0].model == "local-model-route-test"
    other = build_lm("gpt-4o-mini", settings=LMSettings(model="openai/x", api_base="http://127.0.0.1:9/v1"))
    assert capabilities.resolve(other) == caches._original_route(other) != routes[0]
