"""The RLM pool on real workers: Deno-capable workers only, sandboxed code, time limits, no orphans."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from helpers import wait_until
from scripted_lm import scripted_reply

from routing import Client, Session
from routing.errors import NoCapableWorker, SandboxTimeout
from tasks.lm.offline import reply_for
from tasks.local.stack import Stack, WorkerProcess

pytestmark = pytest.mark.sandbox

QUERY = "Identify the top two recurring issues and recommend next actions."
_CODE = re.compile(r"(\[\[ ## code ## \]\]\n)(.*?)(\n\n\[\[ ## )", re.DOTALL)


def incident_log(min_chars: int = 50_000) -> str:
    """A long, realistic log with two recurring incident kinds and noise."""
    kinds = [
        "category=outage checkout API 502s, database connection pool exhausted",
        "category=billing customer charged twice, invoice job retried after timeout",
        "category=outage checkout API 502s, database connection pool exhausted",
        "category=account 2FA reset email not delivered",
        "category=billing customer charged twice, invoice job retried after timeout",
        "category=outage checkout API 502s, database connection pool exhausted",
    ]
    lines, i = [], 0
    while sum(len(x) + 1 for x in lines) < min_chars:
        lines.append(f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:00Z INC-{1000 + i} {kinds[i % len(kinds)]}")
        i += 1
    return "\n".join(lines)


def deno_children(pid: int) -> list[int]:
    """Deno processes whose parent is ``pid`` (the worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name.startswith("deno"):
            found.append(int(entry))
    return found


def gone(pids: list[int]) -> bool:
    return not any(os.path.exists(f"/proc/{p}") for p in pids)


@pytest.fixture(scope="module")
def rlm_workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    workers = [stack.start_worker("rlm_pool", f"rlm-test-{i}", wait=False,
                                  env={"FLAGSHIP_SANDBOX_TIMEOUT_S": "3"}) for i in range(2)]
    stack.wait_ready(workers)
    yield workers
    for worker in workers:
        worker.stop()


def test_rlm_over_a_long_incident_log_answers_from_code_that_ran(
    rlm_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    session = sessions("rlm_pool")
    session.lm(temperature=0.3)
    rlm = session.rlm("context, query -> output", max_iters=4, max_llm_calls=12, max_output_chars=4000)
    context = incident_log()
    assert len(context) >= 50_000
    reply = session.call("call", ref=rlm.ref_id, inputs={"context": context, "query": QUERY}, timeout_s=120)
    trajectory = reply["trajectory"]
    printed = "\n".join(step["output"] for step in trajectory["steps"])
    lines = context.count("\n") + 1
    assert f"analysed {lines} non-empty lines" in printed  # computed in the sandbox, from the context
    outage = sum("category=outage" in line for line in context.splitlines())
    assert f"COUNT {outage} | outage" in printed
    assert "outage" in reply["outputs"]["output"] and str(outage) in reply["outputs"]["output"]
    assert trajectory["iterations"] >= 2 and trajectory["llm_calls"] >= 2
    assert reply["worker"] in {w.node for w in rlm_workers}
    assert context[:2000] not in str(session.history(n=12))  # the log never went into a prompt


def test_program_of_thought_built_by_name_runs_its_code_in_the_sandbox(
    rlm_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    with FakeOpenAI(reply=scripted_reply) as server:
        session = sessions("rlm_pool")
        session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test")
        pot = session.program("dspy:ProgramOfThought", signature="question -> answer", max_iters=2)
        answer = pot(question="What is the sum of 0 to 9?", timeout_s=120)
    assert answer.answer == "45 emscripten"  # printed by Pyodide in the worker's sandbox, not by the worker


def test_a_megabyte_context_stays_in_the_sandbox_and_out_of_the_prompts(
    rlm_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    session = sessions("rlm_pool")
    rlm = session.rlm()
    context = incident_log(1_000_000)
    reply = session.call("call", ref=rlm.ref_id, inputs={"context": context, "query": QUERY}, timeout_s=120)
    assert f"analysed {context.count(chr(10)) + 1} non-empty lines" in reply["trajectory"]["steps"][0]["output"]
    prompts = session.history(n=12)
    assert prompts and max(len(str(e["messages"])) for e in prompts) < 50_000


def _looping_reply(state: dict[str, Any]) -> Callable[[list[dict[str, Any]]], str]:
    """A provider whose first RLM step writes an infinite loop; later steps are the scripted ones."""
    def reply(messages: list[dict[str, Any]]) -> str:
        text = reply_for(messages)
        if not state["looped"] and "[[ ## code ## ]]" in text:
            state["looped"] = True
            return _CODE.sub(lambda m: m.group(1) + "```python\nwhile True:\n    pass\n```" + m.group(3), text)
        return text
    return reply


def test_an_infinite_loop_is_killed_within_the_limit_and_the_worker_serves_the_next_rlm(
    rlm_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    session = sessions("rlm_pool")
    with FakeOpenAI(reply=_looping_reply({"looped": False})) as server:
        lm = session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test")
        rlm = session.rlm(lm=lm)
        started = time.monotonic()
        with pytest.raises(SandboxTimeout) as raised:
            rlm(context=incident_log(5_000), query=QUERY, timeout_s=60)
        # The limit itself is asserted tightly in test_sandbox; this bound covers the LM calls and a fresh sandbox.
        assert time.monotonic() - started < raised.value.timeout_s + 20
    pid = session.call("ping")["pid"]
    session.configure(session.lm())  # back to the offline LM
    again = session.call("call", ref=session.rlm().ref_id, inputs={"context": incident_log(5_000), "query": QUERY},
                         timeout_s=60)
    assert "COUNT" in again["trajectory"]["steps"][0]["output"] and session.call("ping")["pid"] == pid


def test_sandbox_denies_files_env_and_network_to_model_written_code(
    rlm_workers: list[WorkerProcess], sessions: Callable[..., Session]
) -> None:
    escape = ("import os\ntry:\n    print('FILE', open('/etc/hostname').read())\nexcept Exception as e:\n"
              "    print('FILE-DENIED', type(e).__name__)\nprint('ENV', sorted(os.environ)[:20])\n"
              "import urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:1', timeout=2)\n"
              "except Exception as e:\n    print('NET-DENIED', type(e).__name__)\n")
    state = {"done": False}

    def reply(messages: list[dict[str, Any]]) -> str:
        text = reply_for(messages)
        if not state["done"] and "[[ ## code ## ]]" in text:
            state["done"] = True
            return _CODE.sub(lambda m: m.group(1) + "```python\n" + escape + "```" + m.group(3), text)
        return text

    session = sessions("rlm_pool")
    with FakeOpenAI(reply=reply) as server:
        rlm = session.rlm(lm=session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-test"))
        out = session.call("call", ref=rlm.ref_id, inputs={"context": "x", "query": QUERY}, timeout_s=60)
    printed = out["trajectory"]["steps"][0]["output"]
    assert "FILE-DENIED" in printed and "NET-DENIED" in printed
    assert "REDIS_URL" not in printed and "FLAGSHIP_HOME" not in printed


def test_no_capable_worker_is_an_immediate_typed_error(
    client: Client, sessions: Callable[..., Session], stack: Stack
) -> None:
    started = time.monotonic()
    with pytest.raises(NoCapableWorker) as raised:
        client.session("rlm_empty_pool")
    assert time.monotonic() - started < 1.0  # one Redis script, no waiting
    assert raised.value.capabilities == ["deno"]
    triage = sessions("triage_pool")
    with pytest.raises(NoCapableWorker):
        triage.rlm()


def test_a_worker_without_deno_refuses_the_rlm_pool_and_never_consumes_it(stack: Stack) -> None:
    worker = stack.start_worker("rlm_pool", "rlm-nodeno", wait=False,
                                env={"FLAGSHIP_DENO_BIN": "/nonexistent/deno"})
    assert worker.proc.wait(60) == 78
    assert "refuses to serve rlm_pool" in worker.log_tail() and "pip install deno" in worker.log_tail()
    assert not stack.redis.exists(f"flagship:hb:{worker.node}")


def test_no_deno_process_outlives_its_worker_stopped_or_killed(stack: Stack) -> None:
    for how in ("stop", "kill"):
        worker = stack.start_worker("rlm_pool", f"rlm-orphans-{how}", env={"FLAGSHIP_SANDBOX_POOL_SIZE": "2"})
        children = wait_until(lambda w=worker: len(deno_children(w.pid)) >= 2 and deno_children(w.pid),
                              timeout_s=60, what="pre-started sandboxes")
        getattr(worker, how)()
        wait_until(lambda c=children: gone(c), timeout_s=15, what=f"deno children gone after {how}")
