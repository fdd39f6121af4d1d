"""Flower against the real workers: its API with and without basic auth, and its dashboard in Chromium.

Flower is started the way operators start it, through ``deploy/run_flower.py``
(auth from ``FLOWER_BASIC_AUTH``), on a free port, against the session ``stack``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chromium import chromium_binary, chromium_install_timeout_s, png_size_and_colours, run_chromium
from fake_openai import FakeOpenAI
from helpers import wait_until
from sentinel_cluster import SentinelCluster

from routing import Session, names
from routing.pools import PoolTable
from tasks.local.stack import Stack, WorkerProcess
from tasks.sandbox.setup import is_cache_ready

ROOT = Path(__file__).resolve().parents[1]
RUN_FLOWER = ROOT / "deploy" / "run_flower.py"
SCREENSHOT = ROOT / "docs" / "flower.png"
TASKS_SCREENSHOT = ROOT / "docs" / "flower-tasks.png"
MONITORED_POOLS = ("triage_pool", "analytics_pool")
#: The Tasks tab's columns as the deploy files configure them: each call's args repr (session, pool, ref) shows.
TASKS_COLUMNS = "name,args,state,received,runtime,worker"

#: Flower imports the whole Celery app (DSPy included) before it listens.
flower_start_timeout_s = 90.0


@dataclass
class Flower:
    url: str
    user: str
    password: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, *, auth: tuple[str, str] | None | bool = True) -> tuple[int, Any]:
        """GET ``path``; ``auth=True`` uses Flower's credentials, a pair others, ``None`` none."""
        request = urllib.request.Request(self.url + path)
        creds = (self.user, self.password) if auth is True else auth
        if creds:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                kind = response.headers.get("Content-Type", "")
                return response.status, json.loads(body) if "json" in kind else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_http(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/healthcheck", timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answers, whatever it says
    except OSError:
        return False


@contextmanager
def running_flower(stack: Stack, tmp_dir: Path, env: dict[str, str]) -> Iterator[Flower]:
    port = _free_port()
    log_path = tmp_dir / f"flower-{port}.log"
    child_env = {**stack.child_env(env), **{k: env[k] for k in ("REDIS_URL",) if k in env}}  # another broker
    for key in ("FLOWER_BASIC_AUTH", "FLAGSHIP_FLOWER_UNAUTHENTICATED", "FLOWER_UNAUTHENTICATED_API"):
        if key not in env:
            child_env.pop(key, None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(RUN_FLOWER), "--port", str(port), "--address", "127.0.0.1"],
                                env=child_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    user, _, password = env.get("FLOWER_BASIC_AUTH", ":").partition(":")
    flower = Flower(f"http://127.0.0.1:{port}", user, password, proc, log_path)
    try:
        wait_until(lambda: proc.poll() is not None or _answers_http(flower.url), flower_start_timeout_s,
                   interval_s=0.2, what="Flower to listen")
        assert proc.poll() is None, f"Flower exited ({proc.returncode}):\n{flower.log_tail()}"
        yield flower
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def flower(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    auth = f"ops:{secrets.token_urlsafe(12)}"
    env = {"FLOWER_BASIC_AUTH": auth, "FLOWER_TASKS_COLUMNS": TASKS_COLUMNS}
    with running_flower(stack, tmp_path_factory.mktemp("flower"), env) as f:
        yield f


def pool_nodes(stack: Stack) -> set[str]:
    return {w.node for w in stack.workers if w.pool in MONITORED_POOLS and w.alive()}


def session_tasks(flower: Flower, session: Session, **query: str) -> dict[str, Any]:
    """The calls of ``session`` Flower knows, found with its own search (by the args repr), filtered by ``query``."""
    params = urllib.parse.urlencode({"limit": 1000, "search": f'args:"session={session.id}"', **query})
    status, tasks = flower.get(f"/api/tasks?{params}")
    assert status == 200, tasks
    return {tid: t for tid, t in tasks.items() if f"session={session.id}" in (t.get("args") or "")}


def listed_workers(flower: Flower) -> set[str]:
    status, body = flower.get("/api/workers?refresh=1")
    return set(body) if status == 200 and isinstance(body, dict) else set()


def test_flower_refuses_to_start_without_authentication_unless_told_to_run_open() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOWER_BASIC_AUTH", "FLAGSHIP_FLOWER_UNAUTHENTICATED", "FLOWER_UNAUTHENTICATED_API")}
    done = subprocess.run([sys.executable, str(RUN_FLOWER), "--port", str(_free_port())], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "FLOWER_BASIC_AUTH" in done.stderr and "FLAGSHIP_FLOWER_UNAUTHENTICATED=1" in done.stderr


def test_flower_api_answers_401_without_or_with_wrong_credentials(flower: Flower) -> None:
    assert flower.get("/api/workers", auth=None)[0] == 401
    assert flower.get("/api/tasks", auth=None)[0] == 401
    assert flower.get("/", auth=None)[0] == 401
    assert flower.get("/api/workers", auth=(flower.user, flower.password + "x"))[0] == 401
    assert flower.get("/api/workers")[0] == 200


def test_flower_lists_every_worker_of_both_pools_and_the_calls_they_ran(
    stack: Stack, flower: Flower, sessions: Callable[..., Session]
) -> None:
    expected = pool_nodes(stack)
    assert {n.split("-")[0] for n in expected} >= {"triage", "analytics"}
    wait_until(lambda: expected <= listed_workers(flower), 30, interval_s=0.5,
               what=f"Flower to list {sorted(expected)}")

    opened = [sessions(pool) for pool in MONITORED_POOLS for _ in range(2)]
    futures = {s: [s.submit("ping") for _ in range(3)] for s in opened}
    ran_on = {f.id: f.result(30)["node"] for fs in futures.values() for f in fs}

    def seen() -> dict[str, Any]:
        status, tasks = flower.get("/api/tasks?limit=1000")
        if status != 200:
            return {}
        done = {tid: t for tid, t in tasks.items() if tid in ran_on and t.get("state") == "SUCCESS"}
        return done if len(done) == len(ran_on) else {}

    tasks = wait_until(seen, 30, interval_s=0.25, what="Flower to show every call as SUCCESS")
    assert isinstance(tasks, dict)
    for session, fs in futures.items():
        for f in fs:
            task = tasks[f.id]
            assert task["name"] == "flagship.ping"  # the operation, not the one Celery task every call is
            assert task["args"] == f"pool={session.pool} session={session.id}"  # ping has no arguments
            assert task["worker"] == ran_on[f.id]
    # Triage sessions are strict: every call ran on the session's own worker.
    for session, fs in futures.items():
        if session.pool == "triage_pool":
            assert {tasks[f.id]["worker"] for f in fs} == {session.worker}
    assert {t["worker"] for t in tasks.values()} <= expected


def test_flower_names_each_call_by_operation_with_session_pool_and_ref_and_masks_secrets(
    flower: Flower, sessions: Callable[..., Session]
) -> None:
    session = sessions("triage_pool")
    offline = session.lm(temperature=0.2)  # the first LM: the session default
    with FakeOpenAI() as server:
        session.lm("openai/fake-model", api_base=server.base_url, api_key="sk-flower-secret")
    session.configure(offline)
    triage = session.predict("ticket -> category, urgency, action")
    tickets = ["Checkout returns 502 for all customers", "Charged twice", "2FA email never arrives"]
    for ticket in tickets:
        triage(ticket=ticket)
    triage.batch([{"ticket": t} for t in tickets])
    session.call("ping")
    expected = {"flagship.lm": 2, "flagship.set_default_lm": 1, "flagship.predict": 1,
                "flagship.predict.call": len(tickets), "flagship.predict.map": 1, "flagship.ping": 1}

    def counted() -> dict[str, int] | None:
        done = [t for t in session_tasks(flower, session).values() if t.get("state") == "SUCCESS"]
        counts = {name: sum(1 for t in done if t["name"] == name) for name in expected}
        return counts if counts == expected else None

    wait_until(counted, 30, interval_s=0.25, what=f"Flower to show the session's calls by operation {expected}")
    tasks = session_tasks(flower, session)
    # Flower's own filters: by operation (task name), and it lists the operations it has seen.
    runs = session_tasks(flower, session, taskname="flagship.predict.call")
    assert len(runs) == len(tickets) and {t["name"] for t in runs.values()} == {"flagship.predict.call"}
    assert all(t["args"].startswith(f"pool=triage_pool ref={triage.ref_id} session={session.id} inputs=")
               for t in runs.values())
    assert any("Charged twice" in t["args"] for t in runs.values())
    status, types = flower.get("/api/task/types")
    assert status == 200 and set(expected) <= set(types["task-types"])
    # The API key is masked wherever Celery shows the call; the ref being built is named.
    (made,) = [t for t in tasks.values() if t["name"] == "flagship.lm" and "fake-model" in t["args"]]
    assert "sk-flower-secret" not in json.dumps(tasks) and "api_key=***" in made["args"]
    assert all(t["worker"] == session.worker for t in tasks.values())


# -- the Broker page: every pool's queues on the project's transports -------------------------------

#: A pool of the test table no test starts a worker for: what is pushed to its queue stays there.
IDLE_POOL = "rlm_empty_pool"
BROKER_ROW = re.compile(r'<tr id="[^"]*">\s*<td>([^<]+)</td>\s*<td class="broker-secondary-column">([^<]*)</td>')


def broker_page_counts(flower: Flower) -> dict[str, int]:
    """The Broker page's queue table (name -> messages), read from its HTML with Flower's credentials."""
    status, page = flower.get("/broker")
    assert status == 200 and isinstance(page, str), page
    assert "broker is not supported" not in page
    return {html.unescape(name): int(count) for name, count in BROKER_ROW.findall(page)}


def queue_lengths(flower: Flower) -> dict[str, int]:
    status, body = flower.get("/api/queues/length")
    assert status == 200, body
    return {q["name"]: q["messages"] for q in body["active_queues"]}


@contextmanager
def parked_messages(redis: Any, queue: str, count: int) -> Iterator[None]:
    """``count`` items in ``queue`` (a pool no worker serves), removed afterwards."""
    redis.delete(queue)
    redis.lpush(queue, *[json.dumps({"parked": i}) for i in range(count)])
    try:
        yield
    finally:
        redis.delete(queue)


def test_flower_broker_page_shows_every_pools_queue_and_each_workers_direct_queue_with_message_counts(
    stack: Stack, flower: Flower
) -> None:
    pools = {names.pool_queue(p.name) for p in PoolTable.load(os.environ["FLAGSHIP_POOLS"])}
    direct = {names.worker_queue(node) for node in pool_nodes(stack)}
    with parked_messages(stack.redis, names.pool_queue(IDLE_POOL), 3):
        page, api = broker_page_counts(flower), queue_lengths(flower)
    assert pools | direct <= set(page), sorted(pools | direct - set(page))
    assert page[IDLE_POOL] == api[IDLE_POOL] == 3
    assert {q: page[q] for q in pools | direct} == {q: api[q] for q in pools | direct}
    _, body = flower.get("/broker")
    assert "RedisTransport" not in body and "routing.broker.transport" not in body  # the URL, not a class path
    assert flower.get("/broker", auth=None)[0] == 401


def test_flower_broker_page_on_a_sentinel_broker_counts_the_primarys_queues_and_follows_a_failover(
    stack: Stack, tmp_path: Path
) -> None:
    cluster = SentinelCluster(tmp_path / "sentinel")
    cluster.workdir.mkdir()
    try:
        cluster.start()
        env = {"FLOWER_BASIC_AUTH": f"ops:{secrets.token_urlsafe(12)}", "REDIS_URL": cluster.url}
        with running_flower(stack, tmp_path, env) as flower:
            pools = {names.pool_queue(p.name) for p in PoolTable.load(os.environ["FLAGSHIP_POOLS"])}
            primary = cluster.server("primary")
            primary.lpush(names.pool_queue(IDLE_POOL), *["a", "b"])
            wait_until(lambda: cluster.server("replica").llen(IDLE_POOL) == 2, 10, what="the replica to copy them")
            page = broker_page_counts(flower)
            assert pools <= set(page) and page[IDLE_POOL] == 2
            assert "sentinel://127.0.0.1:" in flower.get("/broker")[1]
            # Flower asks the sentinels again: after a failover it counts on the promoted replica.
            cluster.kill_primary()
            cluster.wait_failover()
            cluster.server("replica").lpush(names.pool_queue(IDLE_POOL), "c")
            wait_until(lambda: broker_page_counts(flower).get(IDLE_POOL) == 3, 30, interval_s=0.5,
                       what="the Broker page to count on the new primary")
    finally:
        cluster.stop()


# -- the dashboard in headless Chromium -----------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_binary()


def with_credentials(flower: Flower) -> str:
    if not flower.user:
        return flower.url + "/"
    return flower.url.replace("http://", f"http://{flower.user}:{flower.password}@") + "/"


def dashboard_shows(binary: str, url: str, nodes: set[str]) -> bool:
    """Chromium's rendered DOM of the dashboard names every node (the page passed auth and ran its JS)."""
    dom = run_chromium(binary, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    return "Flower" in dom and all(node in dom for node in nodes)


@pytest.mark.timeout(chromium_install_timeout_s + 300)
def test_flower_dashboard_renders_in_headless_chromium_and_is_saved_as_docs_flower_png(
    stack: Stack, flower: Flower, chromium: str, sessions: Callable[..., Session],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    for pool in MONITORED_POOLS:
        sessions(pool).call("ping", timeout_s=30)
    nodes = pool_nodes(stack)
    target, url = flower, with_credentials(flower)
    with ExitStack() as stack_ctx:
        if not dashboard_shows(chromium, url, nodes):
            # Some Chromium builds ignore credentials in the URL: fall back to an explicitly open Flower.
            target = stack_ctx.enter_context(running_flower(
                stack, tmp_path_factory.mktemp("flower-open"), {"FLAGSHIP_FLOWER_UNAUTHENTICATED": "1"}))
            assert target.get("/api/workers", auth=None)[0] == 200
            url = target.url + "/"
            wait_until(lambda: dashboard_shows(chromium, url, nodes), 60, interval_s=1.0,
                       what="the open Flower dashboard to list every worker")
        shot = tmp_path_factory.mktemp("shot") / "flower.png"
        done = run_chromium(chromium, "--virtual-time-budget=5000", f"--screenshot={shot}", url)
        assert shot.exists(), f"no screenshot: {done.stderr[-1000:]}"
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == (1400, 900)
    assert shot.stat().st_size > 20_000 and colours > 50, f"screenshot looks blank ({colours} colours)"
    # The README's copy is refreshed on request (or when missing), so a test run leaves the tree clean.
    if os.environ.get("FLAGSHIP_UPDATE_DOCS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


# -- the Tasks tab after the demo ------------------------------------------------------------------

#: Operations the demo's calls show as in the Tasks tab (RLM ones only with an RLM worker).
DEMO_OPERATIONS = ("flagship.lm", "flagship.predict", "flagship.predict.call", "flagship.score", "flagship.history")


def run_demo(stack: Stack, rlm_pool: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "demo", "--json", "--stack", "external",
                           "--rlm-pool", rlm_pool], env=stack.child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def tasks_tab_shows(binary: str, url: str, operations: tuple[str, ...]) -> bool:
    """Chromium's rendered DOM of the Tasks tab names every operation (its table loaded past auth)."""
    dom = run_chromium(binary, "--virtual-time-budget=8000", "--dump-dom", url).stdout
    return "Flower" in dom and all(f">{op}<" in dom for op in operations)


@pytest.mark.timeout(chromium_install_timeout_s + 600)
def test_flower_tasks_tab_after_the_demo_lists_calls_by_operation_and_is_saved_as_docs_flower_tasks_png(
    stack: Stack, flower: Flower, chromium: str, pool_workers: Callable[..., list[WorkerProcess]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    refresh = os.environ.get("FLAGSHIP_UPDATE_DOCS") == "1" or not TASKS_SCREENSHOT.exists()
    rlm_pool = "rlm_empty_pool"  # no worker: the demo skips its RLM step
    if refresh and is_cache_ready():  # the README's picture shows the whole run, RLM included
        pool_workers("rlm_pool", 1)
        rlm_pool = "rlm_pool"
    report = run_demo(stack, rlm_pool)
    operations = DEMO_OPERATIONS + (("flagship.rlm", "flagship.rlm.call") if report["rlm"]["status"] == "ok" else ())
    status, types = flower.get("/api/task/types")
    assert status == 200 and set(operations) <= set(types["task-types"])
    target, url = flower, with_credentials(flower) + "tasks"
    with ExitStack() as stack_ctx:
        if not tasks_tab_shows(chromium, url, operations[-2:]):
            # Some Chromium builds ignore credentials in the URL: fall back to an explicitly open Flower.
            target = stack_ctx.enter_context(running_flower(
                stack, tmp_path_factory.mktemp("flower-open"),
                {"FLAGSHIP_FLOWER_UNAUTHENTICATED": "1", "FLOWER_TASKS_COLUMNS": TASKS_COLUMNS}))
            url = target.url + "/tasks"
            run_demo(stack, rlm_pool)  # a new Flower has seen no events yet
            wait_until(lambda: tasks_tab_shows(chromium, url, operations[-2:]), 60, interval_s=1.0,
                       what="the open Flower's Tasks tab to list the demo's operations")
        shot = tmp_path_factory.mktemp("shot") / "flower-tasks.png"
        done = run_chromium(chromium, "--virtual-time-budget=8000", f"--screenshot={shot}", url)
        assert shot.exists(), f"no screenshot: {done.stderr[-1000:]}"
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == (1400, 900)
    assert shot.stat().st_size > 20_000 and colours > 50, f"screenshot looks blank ({colours} colours)"
    if refresh:
        TASKS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, TASKS_SCREENSHOT)
