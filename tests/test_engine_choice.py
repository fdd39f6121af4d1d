"""DSPy's engine choice kept per call shape: the same requests on the wire, one plan, DSPy's path otherwise."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from dspy.clients import execution
from dspy.clients.engines.lm15_engine import LM15Engine

from tasks.bench.helpers.fake_lm_server import FakeOpenAI
from tasks.lm import engine_choice
from tasks.lm.provider import LMSettings, ProviderLM, build_lm

TICKETS = ("Checkout returns 502 for all customers", "Password reset email never arrives", "Please add dark mode")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _lm(server: FakeOpenAI, **kwargs: Any) -> ProviderLM:
    lm = build_lm("local-model", settings=LMSettings(model="openai/x", api_base=server.base_url, retries=0), **kwargs)
    assert isinstance(lm, ProviderLM)
    return lm


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ``LM15Engine.plan`` DSPy makes (the pre-flight build the kept choice saves)."""
    made: list[Any] = []
    original = LM15Engine.plan

    def counted(self: LM15Engine, request: Any) -> Any:
        made.append(request)
        return original(self, request)

    monkeypatch.setattr(LM15Engine, "plan", counted)
    return made


def _sent_bodies(server: FakeOpenAI, since: int) -> list[dict[str, Any]]:
    return [r.body for r in server.requests[since:]]


def test_installed_with_the_worker_lms() -> None:
    _ = ProviderLM("openai/local-model", api_base="http://127.0.0.1:1/v1", api_key="sk-x")
    assert execution._select_engine is engine_choice.choose_engine


def test_same_shape_plans_once_and_sends_what_dspy_sends(server: FakeOpenAI, plans: list[Any]) -> None:
    kept, stock = _lm(server), _lm(server)
    stock._flagship_engine_choices = None  # type: ignore[assignment]  # DSPy's own path on every call
    predict = dspy.Predict("ticket -> category")
    bodies = {}
    for name, lm in (("kept", kept), ("stock", stock)):
        before, start = len(plans), len(server.requests)
        with dspy.context(lm=lm):
            answers = [predict(ticket=t).category for t in TICKETS * 2]
        bodies[name] = (_sent_bodies(server, start), len(plans) - before, answers)
    kept_bodies, kept_plans, kept_answers = bodies["kept"]
    stock_bodies, stock_plans, stock_answers = bodies["stock"]
    assert (kept_plans, stock_plans) == (1, 6)
    assert kept_bodies == stock_bodies and len(kept_bodies) == 6
    assert kept_answers == stock_answers and all(kept_answers)
    assert len(kept._flagship_engine_choices) == 1
    assert [e["outputs"] for e in kept.history] == [e["outputs"] for e in stock.history]


def test_other_options_are_another_shape(server: FakeOpenAI, plans: list[Any]) -> None:
    lm = _lm(server)
    before = len(plans)
    with dspy.context(lm=lm):
        dspy.Predict("ticket -> category")(ticket=TICKETS[0])
        dspy.Predict("ticket -> category")(ticket=TICKETS[1], config={"temperature": 0.7})
        dspy.Predict("ticket -> category")(ticket=TICKETS[2], config={"temperature": 0.7})
    assert len(plans) - before == 2
    assert server.requests[-1].body["temperature"] == 0.7
    assert len(lm._flagship_engine_choices) == 2


@pytest.mark.filterwarnings("ignore:Passing OpenAI-style message:DeprecationWarning")
def test_non_text_content_takes_dspys_path_every_time(server: FakeOpenAI, plans: list[Any]) -> None:
    lm = _lm(server)
    parts = [{"role": "user", "content": [{"type": "text", "text": "classify: printer on fire"}]}]
    before = len(plans)
    for _ in range(3):
        assert lm(messages=parts)
    assert len(plans) - before == 3
    assert len(lm._flagship_engine_choices) == 0
    assert engine_choice.choice_key(lm, execution.prepare(lm, None, parts, {}), False) is None


def test_closed_lm_chooses_again_and_still_answers(server: FakeOpenAI, plans: list[Any]) -> None:
    lm = _lm(server)
    lm("classify: printer on fire")
    [(first, _, _)] = lm._flagship_engine_choices._choices.values()
    lm.close()  # DSPy closes the engine and drops it from the LM's store
    before = len(plans)
    assert lm("classify: printer on fire")
    assert len(plans) - before == 1
    [(second, _, _)] = lm._flagship_engine_choices._choices.values()
    assert second is not first and not second._closed


def test_copies_share_choices_and_deep_copies_start_empty(server: FakeOpenAI) -> None:
    lm = _lm(server)
    lm("hello")
    assert len(lm._flagship_engine_choices) == 1
    assert lm.copy(temperature=0.5)._flagship_engine_choices is lm._flagship_engine_choices
    assert len(copy.deepcopy(lm)._flagship_engine_choices) == 0
    assert len(pickle.loads(pickle.dumps(lm._flagship_engine_choices))) == 0


def test_plain_dspy_lms_are_untouched(server: FakeOpenAI, plans: list[Any]) -> None:
    _lm(server)  # installs the hook
    plain = dspy.LM("openai/local-model", api_base=server.base_url, api_key="sk-x", cache=False)
    before = len(plans)
    for _ in range(2):
        assert plain("hello")
    assert len(plans) - before == 2
