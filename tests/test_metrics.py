"""``flagship metrics`` against the real workers: its ``/metrics`` page, then a real Prometheus scraping it.

The metrics server is started the way operators start it (``flagship metrics --port N``)
on a free port against the session ``stack``; Prometheus is Debian's, installed with
apt-get when missing (skipping with the reason where it cannot be), with a scrape
config pointing at that port.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import debian_binary, wait_until
from prometheus_client.parser import text_string_to_metric_families

from routing import Client, Session, names
from routing.errors import RefNotFound
from tasks.local.stack import Stack

FLAGSHIP = str(Path(sys.executable).with_name("flagship"))
POOLS = ("triage_pool", "analytics_pool")
TRIAGE = "ticket -> category, urgency, action"
#: A pool with no workers (tests/conftest.py): what is sent there stays queued.
IDLE_POOL = "rlm_empty_pool"
#: Debian's prometheus, when the test has to install it.
prometheus_install_timeout_s = 900.0

Sample = dict[str, float]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


@dataclass
class MetricsServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def scrape(self) -> list[tuple[str, dict[str, str], float]]:
        status, text = http_get(self.url + "/metrics")
        assert status == 200, f"/metrics answered {status}:\n{self.log_tail()}"
        return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for n, ls, v in self.scrape() if n == name and labels.items() <= ls.items()]

    def value(self, name: str, **labels: str) -> float | None:
        found = self.values(name, **labels)
        return sum(found) if found else None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextmanager
def running_metrics(stack: Stack, tmp_dir: Path, env: dict[str, str] | None = None) -> Iterator[MetricsServer]:
    port = _free_port()
    log_path = tmp_dir / f"metrics-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([FLAGSHIP, "metrics", "--port", str(port), "--address", "127.0.0.1",
                                 "--sessions-every", "0"], env={**stack.child_env(), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = MetricsServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until(lambda: proc.poll() is not None or http_get(server.url + "/metrics")[0] == 200, 60,
                   interval_s=0.1, what="flagship metrics to listen")
        assert proc.poll() is None, f"flagship metrics exited ({proc.returncode}):\n{server.log_tail()}"
        yield server
    finally:
        proc.terminate()
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
    assert code == 0, f"flagship metrics did not stop cleanly on SIGTERM ({code}):\n{server.log_tail()}"


@pytest.fixture(scope="module")
def metrics(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsServer]:
    with running_metrics(stack, tmp_path_factory.mktemp("metrics")) as server:
        yield server


def live_workers(stack: Stack, pool: str) -> set[str]:
    return {w.node for w in stack.workers if w.pool == pool and w.alive()}


def test_pool_worker_session_and_ref_gauges_match_the_fleet(
    stack: Stack, metrics: MetricsServer, sessions: Callable[..., Session]
) -> None:
    assert metrics.value("flagship_redis_up") == 1
    for pool in POOLS:
        assert metrics.value("flagship_pool_live_workers", pool=pool) == len(live_workers(stack, pool)) == 2
    session = sessions("triage_pool")
    triage = session.predict(TRIAGE, lm=session.lm(temperature=0.2))
    triage(ticket="Checkout returns 502 for all customers")
    node = session.worker
    assert node is not None
    # Refs reach Redis with the worker's next heartbeat.
    wait_until(lambda: (metrics.value("flagship_worker_refs", worker=node) or 0) >= 2, 10, interval_s=0.1,
               what="the worker's refs gauge to count the LM and the Predict")
    assert (metrics.value("flagship_worker_sessions", worker=node) or 0) >= 1
    assert metrics.value("flagship_worker_live", worker=node, pool="triage_pool") == 1
    assert (metrics.value("flagship_sessions", pool="triage_pool") or 0) >= 1
    # A call running for a while shows as in flight on its worker, then no longer.
    slow = session.submit("ping", sleep_s=2.0)
    wait_until(lambda: (metrics.value("flagship_worker_in_flight_calls", worker=node) or 0) >= 1, 10,
               interval_s=0.1, what="the running call to show as in flight")
    assert slow.result(30)["node"] == node
    # Every shared queue and every live worker's direct queue has a depth.
    queues = {ls["queue"]: ls for n, ls, _ in metrics.scrape() if n == "flagship_queue_depth"}
    for pool in POOLS:
        assert queues[names.pool_queue(pool)]["kind"] == "shared"
        for worker in live_workers(stack, pool):
            assert queues[names.worker_queue(worker)] == {"pool": pool, "queue": names.worker_queue(worker),
                                                          "kind": "direct"}


def test_queue_depth_dead_letters_and_rehydrations(metrics: MetricsServer, client: Client,
                                                   sessions: Callable[..., Session]) -> None:
    queue = names.pool_queue(IDLE_POOL)
    assert metrics.value("flagship_queue_depth", queue=queue, kind="shared") == 0
    for _ in range(3):
        client.app.send_task(names.CALL_TASK, args=["no-session", "ping", {}, {"pool": IDLE_POOL}], queue=queue)
    try:
        assert metrics.value("flagship_queue_depth", queue=queue, pool=IDLE_POOL, kind="shared") == 3
    finally:
        client.redis.delete(queue)
    assert metrics.value("flagship_deadletter_messages") == client.redis.llen(names.DEADLETTER_KEY)
    session = sessions("analytics_pool")
    session.call("ping")
    before = metrics.value("flagship_session_rehydrations", pool="analytics_pool") or 0
    # What Router.rehydrate records on the session when it rebuilds it on a new worker.
    client.redis.hincrby(names.session_key(session.id), "rehydrations", 1)
    assert metrics.value("flagship_session_rehydrations", pool="analytics_pool") == before + 1


def test_call_latency_and_outcomes_by_pool_and_operation(metrics: MetricsServer,
                                                         sessions: Callable[..., Session]) -> None:
    def count(pool: str, operation: str, outcome: str = "succeeded") -> float:
        return metrics.value("flagship_calls_total", pool=pool, operation=operation, outcome=outcome) or 0

    triage, analytics = sessions("triage_pool"), sessions("analytics_pool")
    pings, predicts, failed = count("analytics_pool", "ping"), count("triage_pool", "predict.call"), \
        count("triage_pool", "predict.call", "failed")
    for _ in range(3):
        analytics.call("ping")
    module = triage.predict(TRIAGE, lm=triage.lm())
    module(ticket="Refund not received after 10 days")
    with pytest.raises(RefNotFound):
        triage.call("call", ref="predict-000000000000", inputs={"ticket": "x"})
    wait_until(lambda: count("analytics_pool", "ping") >= pings + 3 and count("triage_pool", "predict.call") >=
               predicts + 1 and count("triage_pool", "predict.call", "failed") >= failed + 1, 15, interval_s=0.1,
               what="the calls' task events to be counted")
    assert (metrics.value("flagship_call_duration_seconds_count", pool="triage_pool", operation="predict") or 0) >= 1
    assert (metrics.value("flagship_call_duration_seconds_count", pool="analytics_pool", operation="ping")
            or 0) >= pings + 3
    buckets = {ls["le"]: v for n, ls, v in metrics.scrape() if n == "flagship_call_duration_seconds_bucket"
               and ls["pool"] == "analytics_pool" and ls["operation"] == "ping"}
    assert buckets["+Inf"] >= 3 and buckets["1.0"] >= 3  # a ping takes well under a second


def test_metrics_stay_up_and_say_so_when_redis_is_unreachable(stack: Stack, tmp_path: Path) -> None:
    with running_metrics(stack, tmp_path, {"REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}) as server:
        assert server.value("flagship_redis_up") == 0
        assert server.value("flagship_pool_live_workers") is None


# -- a real Prometheus ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """Debian's ``prometheus``, installed with apt-get when missing (skips if that is not possible)."""
    return debian_binary("prometheus", lambda: shutil.which("prometheus"), prometheus_install_timeout_s)


def prometheus_query(base: str, query: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    if status != 200:
        return []
    reply = json.loads(body)
    return list(reply["data"]["result"]) if reply.get("status") == "success" else []


def by_pool(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("pool", ""): float(r["value"][1]) for r in results}


@pytest.mark.timeout(prometheus_install_timeout_s + 120)
def test_a_real_prometheus_scrapes_the_pool_gauges_and_call_latency(
    stack: Stack, metrics: MetricsServer, prometheus_bin: str, sessions: Callable[..., Session], tmp_path: Path
) -> None:
    target = metrics.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "flagship", "static_configs": [{"targets": [target]}]}],
    }))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or http_get(base + "/-/ready")[0] == 200, 60, interval_s=0.2,
                   what="Prometheus to be ready")
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        session = sessions("analytics_pool")
        for _ in range(3):
            session.call("ping")
        expected = {pool: float(len(live_workers(stack, pool))) for pool in POOLS}
        wait_until(lambda: by_pool(prometheus_query(base, "flagship_pool_live_workers")).items() >= expected.items(),
                   30, interval_s=0.5, what=f"Prometheus to have scraped live workers {expected}")
        (up,) = prometheus_query(base, 'up{job="flagship"}')
        assert up["value"][1] == "1"
        workers = prometheus_query(base, 'flagship_worker_live{pool="triage_pool"}')
        assert {r["metric"]["worker"] for r in workers} >= live_workers(stack, "triage_pool")
        wait_until(lambda: prometheus_query(
            base, 'flagship_call_duration_seconds_count{pool="analytics_pool",operation="ping"} >= 3'),
            30, interval_s=0.5, what="Prometheus to have the pings' latency histogram")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_deploy_prometheus_config_and_grafana_dashboard_check_out_with_promtool_and_a_real_scrape(
    metrics: MetricsServer, prometheus_bin: str, sessions: Callable[..., Session], tmp_path: Path
) -> None:
    promtool = str(Path(prometheus_bin).with_name("promtool"))
    done = subprocess.run([promtool, "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    dashboard = json.loads((DEPLOY / "grafana" / "flagship.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    # promtool parses PromQL only in rules: every panel query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"flagship:panel{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every series the dashboard reads is one `flagship metrics` serves.
    sessions("triage_pool").call("ping")
    wait_until(lambda: metrics.value("flagship_calls_total", operation="ping"), 10, interval_s=0.1,
               what="a ping to be counted")
    served = {name for name, _, _ in metrics.scrape()}
    used = {name for e in exprs for name in re.findall(r"\bflagship_[a-z_]+", e)}
    assert used and used <= served, sorted(used - served)
