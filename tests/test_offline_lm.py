"""The offline scripted LM: DSPy parses its replies, it triages by keyword, its RLM answer comes from code that ran."""

from __future__ import annotations

import builtins
import io
import json
import random
from collections.abc import Callable
from typing import Any, Literal

import dspy
import pytest
from dspy.primitives.code_interpreter import CodeExecutionError, FinalOutput

from tasks.lm.history import history_entries
from tasks.lm.offline import LABEL, OFFLINE_MODEL, OfflineLM, rlm_analysis_code, triage_ticket

TICKETS = [
    ("Checkout is down: every request returns 502 for all customers since 09:40.", "outage", "high"),
    ("I was charged twice for the March invoice, please refund one charge.", "billing", "medium"),
    ("Feature request: it would be nice to export to CSV from the reports page.", "feature", "low"),
    ("I'm locked out of my account after the 2FA reset; the SSO login loops.", "account", "high"),
    ("The dashboard shows the wrong totals and the app crashes when I refresh it.", "bug", "medium"),
]
HELD_OUT = "I cannot update my billing address on the settings page."


class Triage(dspy.Signature):
    """Triage a support ticket."""

    ticket: str = dspy.InputField()
    category: Literal["outage", "billing", "feature", "account", "bug"] = dspy.OutputField()
    urgency: Literal["high", "medium", "low"] = dspy.OutputField()
    action: str = dspy.OutputField()


@pytest.fixture
def lm() -> OfflineLM:
    return OfflineLM()


@pytest.mark.parametrize(("ticket", "category", "urgency"), TICKETS)
def test_predict_triages_realistic_tickets(lm: OfflineLM, ticket: str, category: str, urgency: str) -> None:
    with dspy.context(lm=lm):
        typed = dspy.Predict(Triage)(ticket=ticket)
        plain = dspy.Predict("ticket -> category, urgency, action")(ticket=ticket)
    for pred in (typed, plain):
        assert (pred.category, pred.urgency) == (category, urgency)
        assert pred.action.startswith(f"{LABEL} ")


@pytest.mark.parametrize(("ticket", "category", "urgency"), TICKETS)
def test_chain_of_thought_explains_matched_keywords(lm: OfflineLM, ticket: str, category: str, urgency: str) -> None:
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought(Triage)(ticket=ticket)
    assert (pred.category, pred.urgency) == (category, urgency)
    assert pred.reasoning.startswith(f"{LABEL} ")
    assert "not a model answer" in pred.reasoning
    assert any(f"'{word}'" in pred.reasoning for word in triage_ticket(ticket)["matched"][category])


def test_held_out_billing_address_ticket_is_billing(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought("ticket -> category, urgency, action")(ticket=HELD_OUT)
    assert (pred.category, pred.urgency) == ("billing", "medium")


def test_json_adapter_replies_parse_too(lm: OfflineLM) -> None:
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = dspy.ChainOfThought(Triage)(ticket=TICKETS[0][0])
    assert (pred.category, pred.urgency) == ("outage", "high")


def test_literal_choices_are_respected_for_unknown_categories(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        pred = dspy.Predict("ticket -> category: Literal['hardware', 'software']")(ticket=TICKETS[0][0])
    assert pred.category == "hardware"  # outage is not allowed: the first allowed choice, deterministically


def test_any_signature_gets_labelled_typed_placeholders(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        pred = dspy.Predict("question -> answer, confidence: float, done: bool, tags: list[str]")(question="Why?")
    assert pred.answer.startswith(f"{LABEL} placeholder")
    assert (pred.confidence, pred.done, pred.tags) == (0.0, False, [])


def test_bare_prompt_such_as_llm_query_gets_a_labelled_answer(lm: OfflineLM) -> None:
    [text] = lm("Summarise these incidents in one sentence.")
    assert text.startswith(f"{LABEL} ") and "not a model answer" in text


def test_history_entries_are_recorded_labelled_and_json_safe(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        for ticket, _, _ in TICKETS[:3]:
            dspy.Predict(Triage)(ticket=ticket)
    raw = lm.history[-1]
    assert raw["offline"] is True and raw["cost"] == 0.0 and raw["model"] == OFFLINE_MODEL
    assert raw["usage"]["prompt_tokens"] > 0 and raw["usage"]["completion_tokens"] > 0
    entries = history_entries(lm, n=2, max_chars=50)
    assert [e["index"] for e in entries] == [1, 2]
    assert json.loads(json.dumps(entries)) == entries
    assert all(e["offline"] and e["cost"] == 0.0 and e["usage"]["total_tokens"] for e in entries)
    assert all(len(m["content"]) <= 50 + len("... [99999 more chars]") for e in entries for m in e["messages"])
    assert history_entries(lm, since_index=2)[0]["index"] == 2
    printed = io.StringIO()
    lm.inspect_history(1, file=printed)
    assert "[[ ## category ## ]]" in printed.getvalue()


# -- RLM -------------------------------------------------------------------------

_ALLOWED_IMPORTS = {"re", "collections"}
_SAFE_BUILTINS = ("len", "str", "int", "float", "list", "dict", "set", "tuple", "sorted", "sum", "max", "min",
                  "any", "all", "next", "enumerate", "zip", "range", "repr", "isinstance")


class _Submitted(Exception):
    def __init__(self, output: dict[str, Any]) -> None:
        super().__init__("SUBMIT")
        self.output = output


class TinyInterpreter:
    """Test double for dspy's Deno sandbox: runs code in-process with a restricted namespace (tests only)."""

    def __init__(self) -> None:
        self.tools: dict[str, Callable[..., Any]] = {}
        self.output_fields: list[dict[str, str]] | None = None
        self.namespace: dict[str, Any] | None = None
        self.executed: list[str] = []

    def start(self) -> None:
        if self.namespace is None:
            def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
                if name.split(".")[0] not in _ALLOWED_IMPORTS:
                    raise ImportError(f"import of {name!r} is not allowed here")
                return builtins.__import__(name, *args, **kwargs)

            allowed = {name: getattr(builtins, name) for name in _SAFE_BUILTINS}
            self.namespace = {"__builtins__": {**allowed, "__import__": guarded_import}}

    def execute(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        self.start()
        assert self.namespace is not None
        printed: list[str] = []

        def submit(**fields: Any) -> None:
            raise _Submitted(fields)

        self.namespace.update({**(variables or {}), **self.tools, "SUBMIT": submit,
                               "print": lambda *args, **_: printed.append(" ".join(map(str, args)))})
        self.executed.append(code)
        try:
            exec(compile(code, "<rlm-step>", "exec"), self.namespace)  # test double only
        except _Submitted as done:
            return FinalOutput(done.output)
        except SyntaxError:
            raise
        except Exception as exc:
            raise CodeExecutionError(f"{type(exc).__name__}: {exc}") from exc
        return "\n".join(printed)

    def shutdown(self) -> None:
        self.namespace = None


def _incident_log(lines: int = 300) -> str:
    rng = random.Random(7)
    kinds = ["db connection pool exhausted on orders-db"] * 5 + ["upstream timeout calling payments gateway (504)"] * 3
    kinds += ["disk usage 95% on /var/log volume", "cache eviction storm on redis-main"]
    return "\n".join(f"2025-03-{i % 28 + 1:02d}T{i % 24:02d}:00Z ERROR {rng.choice(kinds)}" for i in range(lines))


def test_rlm_answer_comes_from_counts_printed_by_code_that_ran(lm: OfflineLM) -> None:
    made: list[TinyInterpreter] = []

    def factory() -> TinyInterpreter:
        made.append(TinyInterpreter())
        return made[-1]

    log = _incident_log()
    with dspy.context(lm=lm):
        rlm = dspy.RLM("context, query -> output", max_iters=4, max_llm_calls=12, max_output_chars=4000,
                       interpreter_factory=factory)
        result = rlm(context=log, query="What are the top two recurring issues, and what should we do next?")

    first, last = result.trajectory[0], result.trajectory[-1]
    assert len(result.trajectory) == 2
    assert "Counter" in first["code"] and "context" in first["code"]
    db = sum("db connection" in line for line in log.splitlines())
    timeouts = sum("timeout" in line for line in log.splitlines())
    assert f"COUNT {db} | database connection errors" in first["output"]
    assert f"COUNT {timeouts} | upstream timeouts / 5xx" in first["output"]
    assert "SUBMIT(" in last["code"] and last["output"].startswith("FINAL:")
    assert result.output.startswith(f"{LABEL} ")
    assert f"database connection errors ({db} occurrences)" in result.output
    assert f"upstream timeouts / 5xx ({timeouts} occurrences)" in result.output
    assert "Recommended next actions" in result.output
    assert any("COUNT" in code for code in made[0].executed)  # the analysis really ran in the interpreter


def test_rlm_extract_fallback_reuses_printed_counts(lm: OfflineLM) -> None:
    log = "\n".join(["ERROR disk full on /var", "ERROR cache eviction on redis", "ERROR disk full again"] * 4)
    with dspy.context(lm=lm):
        result = dspy.RLM("context, query -> output", max_iters=1, interpreter_factory=TinyInterpreter)(
            context=log, query="Top issues?")
    assert result.final_reasoning == "Extract forced final output"
    assert "disk space exhaustion (8 occurrences)" in result.output
    assert result.output.startswith(f"{LABEL} ")


def test_rlm_typed_outputs_get_typed_placeholders(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        result = dspy.RLM("context, query -> output, confidence: float", max_iters=3,
                          interpreter_factory=TinyInterpreter)(context=_incident_log(20), query="Top issues?")
    assert len(result.trajectory) == 2 and result.confidence == 0.0
    assert "occurrences" in result.output


def test_rlm_analysis_code_refuses_a_non_identifier() -> None:
    compile(rlm_analysis_code("incident_log"), "<check>", "exec")
    with pytest.raises(ValueError):
        rlm_analysis_code("context); import os; (")
