"""Users' own DSPy programs on real workers: loaded by name, equal to one process, typed errors, state, evaluate."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from conftest import PROGRAM_PATHS
from fake_openai import FakeOpenAI
from helpers import started_workers, wait_until
from scripted_lm import scripted_reply

from routing import Client, Prediction, Session
from routing.errors import InvalidArgument, NoCapableWorker, ProgramError, UnknownProgram
from routing.fleet.registry import Registry
from tasks.local.stack import Stack, WorkerProcess

sys.path[:0] = [p for p in PROGRAM_PATHS if p not in sys.path]  # this process runs the same programs

from user_programs.agents import TwoStep, exact_category, order_agent  # noqa: E402

POOL = "program_pool"
TWO_STEP = "user_programs.agents:TwoStep"
TICKETS = ["I was charged twice for my subscription", "The checkout page returns 502 errors for everyone",
           "Please add a dark mode", "I cannot log in, my password reset email never arrives"]


@pytest.fixture(scope="module")
def program_workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    with started_workers(stack, [POOL, POOL]) as workers:
        yield workers


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=scripted_reply) as fake:
        yield fake


@pytest.fixture
def local_lm(server: FakeOpenAI) -> dspy.LM:
    return dspy.LM("openai/fake-model", api_base=server.base_url, api_key="sk-test", cache=False)


@pytest.fixture
def program_session(program_workers: list[WorkerProcess], sessions: Callable[..., Session],
                    server: FakeOpenAI) -> Session:
    session = sessions(POOL)
    session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test")
    return session


def in_process(program: dspy.Module, lm: dspy.LM, **inputs: Any) -> dict[str, Any]:
    with dspy.context(lm=lm):
        prediction = program(**inputs)
    return json.loads(json.dumps(dict(prediction.items()), default=str))


def test_a_two_predictor_program_answers_through_the_fleet_as_in_one_process(
    program_session: Session, local_lm: dspy.LM
) -> None:
    triage = program_session.program(TWO_STEP, style="terse")
    assert triage.path == TWO_STEP and triage.handle.info["predictors"] == ["classify", "act"]
    for ticket in TICKETS:
        assert dict(triage(ticket=ticket)) == in_process(TwoStep(style="terse"), local_lm, ticket=ticket)
    future = triage.submit(ticket=TICKETS[0])
    assert isinstance(future.result(30), Prediction)  # a future gives what a call gives
    assert future.result().category == in_process(TwoStep(), local_lm, ticket=TICKETS[0])["category"]
    assert [p.action for p in triage.batch([{"ticket": t} for t in TICKETS])] == \
        [in_process(TwoStep(), local_lm, ticket=t)["action"] for t in TICKETS]
    history = program_session.history(n=4)
    assert len(history) == 4 and all(e["model"] == "openai/fake-model" for e in history)  # both predictors' calls


def test_state_from_dump_state_or_a_saved_file_changes_the_prompts_exactly_as_load_state(
    program_session: Session, local_lm: dspy.LM, server: FakeOpenAI, tmp_path: Path
) -> None:
    tuned = TwoStep()
    tuned.classify.demos = [dspy.Example(ticket="Refund my double charge", category="billing", urgency="high")]
    tuned.act.signature = tuned.act.signature.with_instructions("Answer like a tuned support lead.")
    state = tuned.dump_state()
    tuned.save(str(tmp_path / "triage.json"))
    local = TwoStep()
    local.load_state(state)

    def prompts(run: Callable[[], Any]) -> list[Any]:
        before = len(server.requests)
        run()
        return [r.messages for r in server.requests[before:]]

    expected = prompts(lambda: in_process(local, local_lm, ticket=TICKETS[1]))
    assert "Refund my double charge" in json.dumps(expected[0]) and "tuned support lead" in json.dumps(expected[1])
    for given in (state, str(tmp_path / "triage.json"), (tmp_path / "triage.json").read_text()):
        ref = program_session.program(TWO_STEP, state=given)
        assert prompts(lambda ref=ref: ref(ticket=TICKETS[1])) == expected
    assert ref.dump_state()["classify"]["demos"] == state["classify"]["demos"]


def test_react_agents_call_package_tools_as_in_one_process(program_session: Session, local_lm: dspy.LM) -> None:
    question = "Where is my order A-17?"
    expected = in_process(order_agent(), local_lm, question=question)
    agent = program_session.program("user_programs.agents:order_agent")
    built_in = program_session.program("dspy:ReAct", signature="question -> answer", max_iters=3,
                                       tools=["user_programs.agents:lookup_order"])
    for ref in (agent, built_in):
        answer = ref(question=question)
        assert dict(answer) == expected
        assert answer.answer == "Order A-17: shipped, arriving Tuesday"
        assert answer.trajectory["tool_name_0"] == "lookup_order"  # the trajectory, as JSON


@pytest.mark.parametrize("path", [
    "os:system", "json:loads", "sentinel_never_imported:Anything", "user_programs.agents:getcwd",
    "user_programs.agents:NOT_A_PROGRAM", "user_programs.agents:Missing", "user_programs.nope:TwoStep",
    "dspy:Parallel", "not a path", "user_programs.agents:TwoStep; import os",
])
def test_a_path_no_worker_lists_is_unknown_program_and_nothing_is_imported(
    program_session: Session, stack: Stack, path: str
) -> None:
    with pytest.raises(UnknownProgram):
        program_session.program(path)
    with pytest.raises(UnknownProgram):
        program_session.program("dspy:ReAct", signature="question -> answer", tools=[path])
    assert not (stack.settings.home / "sentinel_never_imported.was_imported").exists()
    assert program_session.call("ping")["node"] == program_session.worker


def test_an_exception_in_forward_is_a_program_error_and_the_session_keeps_serving(program_session: Session) -> None:
    broken = program_session.program("user_programs.agents:Explodes")
    with pytest.raises(ProgramError) as raised:
        broken(text="boom")
    assert raised.value.error_type == "ValueError" and "'boom'" in raised.value.message
    assert "in forward" in raised.value.traceback
    assert broken(text="hello").reply  # the same worker, the same session, next call fine
    with pytest.raises(InvalidArgument):
        program_session.program(TWO_STEP, no_such_argument=1)
    with pytest.raises(InvalidArgument):
        program_session.program(TWO_STEP, state={"classify": "not a state"})
    with pytest.raises(InvalidArgument):
        broken(wrong_input="x")
    with pytest.raises(NoCapableWorker):  # its code would run in a sandbox: only on Deno workers
        program_session.program("dspy:ProgramOfThought", signature="question -> answer")


def test_a_rehydrated_session_rebuilds_its_program_with_its_state(
    client: Client, sessions: Callable[..., Session], pool_workers: Callable[..., list[WorkerProcess]],
    server: FakeOpenAI, local_lm: dspy.LM
) -> None:
    workers = {w.node: w for w in pool_workers("program_kill_pool", 2)}
    session = sessions("program_kill_pool", rehydrate=True)
    session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test")
    tuned = TwoStep()
    tuned.classify.demos = [dspy.Example(ticket="Refund my double charge", category="billing", urgency="high")]
    triage = session.program(TWO_STEP, state=tuned.dump_state())
    state = triage.dump_state()
    dead = session.worker
    assert dead is not None
    workers[dead].kill()
    wait_until(lambda: not client.watch.get(dead).live, what="death noticed")
    answer = triage(ticket=TICKETS[0])
    assert session.worker != dead and session.rehydrations == 1
    assert triage.dump_state() == state  # the demos came back with the program
    assert dict(answer) == in_process(tuned, local_lm, ticket=TICKETS[0])


def test_workers_show_their_program_modules(program_workers: list[WorkerProcess], client: Client) -> None:
    infos = Registry(client.redis, client.settings).workers([POOL])
    assert all({"user_programs.agents", "support_programs.triage"} <= set(i.programs) for i in infos if i.live)


def test_a_worker_listing_a_module_that_fails_to_import_refuses_to_start(stack: Stack) -> None:
    for module in ("no_such_programs", "broken_programs"):
        worker = stack.start_worker(POOL, wait=False, env={"FLAGSHIP_PROGRAMS": module})
        assert worker.proc.wait(60) == 78
        assert f"program module {module!r} failed to import" in worker.log_tail()


def test_client_evaluate_scores_as_dspy_evaluate_does_in_one_process(
    program_workers: list[WorkerProcess], client: Client, server: FakeOpenAI, local_lm: dspy.LM
) -> None:
    labels = ["billing", "outage", "feature_request", "account"]
    devset = [dspy.Example(ticket=t, category=c).with_inputs("ticket") for t, c in zip(TICKETS, labels)]
    devset += [dspy.Example(ticket="boom", category="other").with_inputs("ticket"),
               dspy.Example(ticket="my invoice is wrong", category="outage").with_inputs("ticket")]
    with dspy.context(lm=local_lm):
        expected = dspy.Evaluate(devset=devset, metric=exact_category, num_threads=1)(TwoStep())
    lm = {"model": "openai/fake-model", "api_base": server.base_url, "api_key": "sk-test"}
    result = client.evaluate(POOL, TWO_STEP, devset, "user_programs.agents:exact_category", lm=lm)
    assert result.score == expected.score and 0 < result.score < 100
    assert [score for *_, score in result.results] == [float(score) for *_, score in expected.results]
    assert [e is x for (e, *_), x in zip(result.results, devset)] == [True] * len(devset)
    (index, error), = result.errors
    assert index == 4 and isinstance(error, ProgramError)
    mapped = client.map(POOL, examples=[{"ticket": t} for t in TICKETS], program=TWO_STEP, lm=lm)
    assert [o["category"] for o in mapped.outputs] == [p.category for _, p, _ in result.results[:4]]
