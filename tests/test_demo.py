"""The flagship run end to end against real workers: routing, RLM, analytics, history, rehydration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_openai import FakeOpenAI

from routing import Client, Session
from tasks.local.demo.data import HOLDOUT, TICKETS
from tasks.local.demo.main import main as demo_main
from tasks.local.demo.run import SKIP_MESSAGE, Hooks
from tasks.local.stack import Stack, WorkerProcess

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def rlm_workers(stack: Stack) -> Iterator[list[WorkerProcess]]:
    workers = [stack.start_worker("rlm_pool", f"rlm-demo-{i}", wait=False) for i in range(2)]
    stack.wait_ready(workers)
    yield workers
    for worker in workers:
        worker.stop()


def run_demo(stack: Stack, *args: str) -> tuple[dict[str, Any], str]:
    env = {**os.environ, "REDIS_URL": stack.redis_url}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "demo", "--json", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr


def assert_history_is_own(report: dict[str, Any]) -> None:
    tickets = {tid: text for tid, text, _, _ in TICKETS} | {HOLDOUT[0]: HOLDOUT[1]}
    for name in ("triage_1", "triage_2"):
        own = {t["ticket_id"] for t in report["triage"] if t["session"] == name}
        if name == "triage_1":
            own.add(HOLDOUT[0])
        previews = [e["prompt_preview"] for e in report["history"][name]["entries"]]
        assert previews, name
        for preview in previews:
            matches = {tid for tid, text in tickets.items() if preview.startswith(text[:40])}
            assert matches and matches <= own, (name, preview)


def test_flagship_demo_json_against_real_workers(
    stack: Stack, rlm_workers: list[WorkerProcess], client: Client
) -> None:
    report, _ = run_demo(stack)
    sessions = {s["name"]: s for s in report["sessions"]}
    assert sessions["triage_1"]["worker"] != sessions["triage_2"]["worker"]
    pids = {w.node: w.pid for w in stack.workers}
    for item in report["triage"]:
        assert item["worker"] == sessions[item["session"]]["worker"]
        assert item["worker"] in pids
    assert [(t["category"], t["urgency"]) for t in report["triage"]] == [(c, u) for _, _, c, u in TICKETS]

    rlm = report["rlm"]
    assert rlm["status"] == "ok"
    assert rlm["worker"] in {w.node for w in rlm_workers}
    assert "deno" in client.registry.workers(["rlm_pool"])[0].capabilities
    printed = "\n".join(rlm["outputs"])
    assert "COUNT" in printed and any("context" in code for code in rlm["code"])
    top = printed.split("COUNT ")[1].split("\n")[0]  # "<n> | <theme>", computed in the sandbox
    assert top.split(" | ")[1] in rlm["answer"] and top.split(" | ")[0] in rlm["answer"]

    scores = [t["score"] for t in report["triage"]]
    analytics = report["analytics"]
    assert analytics["mean"] == pytest.approx(float(np.mean(scores)))
    assert analytics["std"] == pytest.approx(float(np.std(scores)))
    assert analytics["p80"] == pytest.approx(float(np.percentile(scores, 80)))
    assert analytics["numpy_version"] == np.__version__
    assert report["holdout"]["category"] == "billing"
    assert report["lm"]["offline"] is True
    assert_history_is_own(report)
    assert report["rehydrations"] == []


def test_flagship_demo_skips_rlm_when_no_worker_has_deno(stack: Stack) -> None:
    report, stderr = run_demo(stack, "--rlm-pool", "rlm_empty_pool")
    assert report["rlm"]["status"] == "skipped"
    assert report["rlm"]["message"] == SKIP_MESSAGE and SKIP_MESSAGE in stderr
    assert len(report["triage"]) == 5 and report["analytics"]["mean"] == pytest.approx(1.0)


def test_flagship_demo_rehydrates_a_strict_session_whose_worker_was_killed(
    stack: Stack, pool_workers: Callable[..., list[WorkerProcess]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers = {w.node: w for w in pool_workers("kill_pool", 2)}
    killed: list[str] = []

    def kill_triage_1(step: str, sessions: dict[str, Session]) -> None:
        if step == "triage":
            node = sessions["triage_1"].worker
            workers[node].kill()
            killed.append(node)

    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    code = demo_main(["--json", "--stack", "external", "--triage-pool", "kill_pool", "--rlm-pool", "rlm_empty_pool"],
                     hooks=Hooks(after_step=kill_triage_1))
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)
    assert len(report["rehydrations"]) == 1
    rehydrated = report["rehydrations"][0]
    assert rehydrated["session"] == "triage_1" and rehydrated["from"] == killed[0] != rehydrated["to"]
    assert "rehydrating the session once" in captured.err
    assert report["holdout"]["category"] == "billing" and report["holdout"]["worker"] == rehydrated["to"]
    assert report["history"]["triage_1"]["complete"] is False


def test_flagship_demo_on_its_own_stack_with_a_real_http_lm(tmp_path: Path) -> None:
    """`--stack own` starts an embedded server and 2 workers per pool; the LM is dspy.LM over HTTP."""
    with FakeOpenAI() as server:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update({"FLAGSHIP_HOME": str(tmp_path), "FLAGSHIP_LM": "openai/fake-model",
                    "FLAGSHIP_LM_API_BASE": server.base_url, "FLAGSHIP_LM_API_KEY": "sk-demo"})
        done = subprocess.run([sys.executable, "-m", "tasks.cli", "demo", "--json", "--stack", "own"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        requests = list(server.requests)
    assert report["lm"] == {"model": "openai/fake-model", "offline": False}
    assert [t["category"] for t in report["triage"]] == [c for _, _, c, _ in TICKETS]
    assert report["rlm"]["status"] == "ok" and report["rlm"]["llm_calls"] >= 2
    assert len(requests) >= 6 + report["rlm"]["llm_calls"]
    assert all(r.headers["authorization"] == "Bearer sk-demo" for r in requests)
    entries = report["history"]["triage_1"]["entries"]
    assert entries and all(e["model"] == "openai/fake-model" and e["tokens"] > 0 for e in entries)
    assert not (tmp_path / "server.json").exists()  # the demo stopped the server it started
