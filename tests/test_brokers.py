"""Pools on their own brokers: two real Valkey servers, workers of each pool on its own, one producer.

``analytics_pool`` (hint) and ``far_pool`` (strict) live on server 2 (the pool
table's ``broker``); ``triage_pool`` and ``rlm_pool`` on server 1, the default.
Every key and queue of a pool must be on its own server only (both servers are
scanned), one Client must run calls of both, and the flagship demo must run
across both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.core import Metric
from redis import Redis

from routing import Client, Settings, names
from routing.broker.connect import redis_client
from routing.broker.embedded import ensure_server, stop_server
from routing.errors import SessionNotFound
from routing.pools import PoolTable
from tasks.local.demo.data import TICKETS
from tasks.local.metrics import Broker, FleetCollector
from tasks.local.stack import Stack, WorkerProcess
from tasks.worker.refusal import EXIT_REFUSED

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]

#: Pools on server 2; the rest of the table stays on the default broker (server 1).
FAR_POOLS = ("analytics_pool", "far_pool")


@dataclass
class TwoBrokers:
    url1: str
    url2: str
    stack: Stack
    settings: Settings
    env: dict[str, str]
    near: list[WorkerProcess]
    far: list[WorkerProcess]

    def redis(self, url: str) -> Redis:
        return redis_client(url, decode_responses=True)

    def run_cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)


def pool_table(url2: str) -> dict[str, Any]:
    return {
        "triage_pool": {"concurrency": 2},
        "analytics_pool": {"broker": url2},
        "far_pool": {"affinity": "strict_queue", "size": 1, "concurrency": 2, "broker": url2},
    }


@pytest.fixture(scope="module")
def brokers(flagship_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoBrokers]:
    homes = [tmp_path_factory.mktemp("broker1"), tmp_path_factory.mktemp("broker2")]
    base = replace(Settings.from_env(), redis_url=None)
    url1, url2 = (ensure_server(replace(base, home=home)) for home in homes)
    table = json.dumps(pool_table(url2))
    settings = replace(base, redis_url=url1, home=homes[0], pools_config=table)
    env = {**os.environ, "REDIS_URL": url1, "FLAGSHIP_HOME": str(homes[0]), "FLAGSHIP_POOLS": table}
    stack = Stack(settings, env={"FLAGSHIP_POOLS": table, "FLAGSHIP_SANDBOX_POOL_SIZE": "1"}, loglevel="warning")
    try:
        near = [stack.start_worker("triage_pool", f"b-triage-{i}", wait=False) for i in (1, 2)]
        near.append(stack.start_worker("rlm_pool", "b-rlm-1", wait=False))
        far = [stack.start_worker("analytics_pool", f"b-analytics-{i}", wait=False) for i in (1, 2)]
        far.append(stack.start_worker("far_pool", "b-far-1", wait=False))
        stack.wait_ready(near + far)
        yield TwoBrokers(url1, url2, stack, settings, env, near, far)
    finally:
        stack.stop()
        for home in homes:
            stop_server(home)


def keys_of(redis: Redis) -> set[str]:
    return {str(key) for key in redis.scan_iter(count=1000)}


def mentions(keys: set[str], redis: Redis, markers: set[str]) -> set[str]:
    """Keys (or members of kombu's queue-binding sets) on a server that name one of ``markers``."""
    found = {key for key in keys if any(m in key for m in markers)}
    for key in keys:
        if key.startswith("_kombu.binding."):
            found |= {f"{key} {m!r}" for m in redis.smembers(key) if any(x in m for x in markers)}
    return found


def test_each_pools_queues_and_keys_live_only_on_its_own_broker_and_one_client_calls_both(
    brokers: TwoBrokers,
) -> None:
    near_nodes = {w.node for w in brokers.near}
    far_nodes = {w.node for w in brokers.far}
    with Client(brokers.url1, brokers.settings) as client:
        assert len(client.links) == 1  # the far broker's link is made on first use
        triage, analytics, far = (client.session(p) for p in ("triage_pool", "analytics_pool", "far_pool"))
        assert len(client.links) == 2
        assert triage.worker in near_nodes and {analytics.worker, far.worker} <= far_nodes
        far.context("a text kept on server 2")  # a stored copy under the session, on server 2
        futures = {s.pool: [s.submit("ping") for _ in range(4)] for s in (triage, analytics, far)}
        replies = {pool: [f.result(30) for f in fs] for pool, fs in futures.items()}
        assert {r["node"] for r in replies["triage_pool"]} == {triage.worker}
        assert {r["node"] for r in replies["far_pool"]} == {far.worker}
        assert {r["node"] for r in replies["analytics_pool"]} <= far_nodes

        r1, r2 = brokers.redis(brokers.url1), brokers.redis(brokers.url2)
        keys1, keys2 = keys_of(r1), keys_of(r2)
        on = {brokers.url1: (keys1, keys2), brokers.url2: (keys2, keys1)}
        for url, nodes, pools, sessions in ((brokers.url1, near_nodes, ("triage_pool", "rlm_pool"), [triage]),
                                            (brokers.url2, far_nodes, FAR_POOLS, [analytics, far])):
            own, other = on[url]
            expected = {k for node in nodes for k in (names.worker_key(node), names.heartbeat_key(node),
                                                      f"_kombu.binding.{names.worker_queue(node)}")}
            expected |= {k for pool in pools for k in (names.pool_workers_key(pool),
                                                       f"_kombu.binding.{names.pool_queue(pool)}")}
            expected |= {names.session_key(s.id) for s in sessions}
            expected |= {f"celery-task-meta-{f.id}" for s in sessions for f in futures[s.pool]}
            assert expected <= own, expected - own
            assert not expected & other, expected & other
        assert names.session_contexts_key(far.id) in keys2
        assert set(r1.hvals(names.DIRECT_QUEUES_KEY)) == {"triage_pool", "rlm_pool"}
        assert set(r2.hvals(names.DIRECT_QUEUES_KEY)) == set(FAR_POOLS)
        # Nothing on either server names the other's pools, nodes or sessions (queues, pidboxes, results).
        far_markers = {*FAR_POOLS, *far_nodes, analytics.id, far.id}
        near_markers = {"triage_pool", "rlm_pool", *near_nodes, triage.id}
        assert mentions(keys1, r1, near_markers) and mentions(keys2, r2, far_markers)  # the scan sees them
        assert not mentions(keys1, r1, far_markers)
        assert not mentions(keys2, r2, near_markers)

        # Another producer finds each session on its broker (the default first, or the pool's when named).
        with Client(brokers.url1, brokers.settings) as other_client:
            assert other_client.attach(analytics.id).call("ping", timeout=30)["node"] in far_nodes
            assert other_client.attach(far.id, pool="far_pool").call("ping", timeout=30)["node"] == far.worker
            assert other_client.attach(triage.id).call("ping", timeout=30)["node"] == triage.worker
            with pytest.raises(SessionNotFound):
                other_client.attach("no-such-session")
        for session in (triage, analytics, far):
            session.close()
        assert not r2.exists(names.session_key(far.id)) and not r1.exists(names.session_key(triage.id))
        r1.close()
        r2.close()


def test_a_worker_started_against_another_broker_than_its_pools_refuses_in_one_line(brokers: TwoBrokers) -> None:
    cmd = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "threads", "-c", "1",
           "-n", "b-misplaced@localhost", "-Q", "analytics_pool", "--without-mingle", "--without-gossip"]
    done = subprocess.run(cmd, env=brokers.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_REFUSED, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "refuses to serve analytics_pool" in line]
    assert len(lines) == 1 and brokers.url2.split("//")[1] in lines[0] and "flagship worker --pool" in lines[0]
    assert not brokers.redis(brokers.url1).exists(names.heartbeat_key("b-misplaced@localhost"))


def test_status_shows_every_broker_with_its_pools_workers_and_sessions(brokers: TwoBrokers) -> None:
    with Client(brokers.url1, brokers.settings) as client:
        session = client.session("far_pool")
        done = brokers.run_cli("status", "--json", timeout_s=60)
        tables = brokers.run_cli("status", timeout_s=60)
        session.close()
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    shown = {b["url"]: b for b in data["brokers"]}
    assert list(shown) == [brokers.url1, brokers.url2]
    assert shown[brokers.url2]["pools"] == list(FAR_POOLS) and "triage_pool" in shown[brokers.url1]["pools"]
    assert shown[brokers.url2]["primary"] == brokers.url2.split("//")[1].split("/")[0]
    pools = {p["name"]: p for p in data["pools"]}
    assert pools["analytics_pool"]["broker"] == brokers.url2 and pools["analytics_pool"]["live_workers"] == 2
    assert pools["far_pool"]["live_workers"] == 1 and pools["triage_pool"]["live_workers"] == 2
    workers = {w["node"]: w for w in data["workers"]}
    assert all(workers[w.node]["broker"] == brokers.url2 and workers[w.node]["live"] for w in brokers.far)
    assert next(s for s in data["sessions"] if s["id"] == session.id)["broker"] == brokers.url2
    assert tables.returncode == 0 and "brokers" in tables.stdout and "b-far-1" in tables.stdout


def test_metrics_read_every_broker(brokers: TwoBrokers) -> None:
    table = PoolTable.load(brokers.settings.pools_config)
    from routing.broker.brokers import by_broker

    parts = [Broker(url, brokers.redis(url), pools) for url, pools in by_broker(table, brokers.url1)]
    families: dict[str, Metric] = {m.name: m for m in FleetCollector(parts, brokers.settings).collect()}

    def value(name: str, **labels: str) -> float | None:
        return next((s.value for s in families[name].samples if labels.items() <= s.labels.items()), None)

    assert value("flagship_redis_up") == 1
    assert value("flagship_broker_up", broker=brokers.url2) == 1 and value("flagship_broker_up", broker=brokers.url1)
    assert value("flagship_pool_broker", pool="analytics_pool", broker=brokers.url2) == 1
    assert value("flagship_pool_live_workers", pool="analytics_pool") == 2
    assert value("flagship_pool_live_workers", pool="triage_pool") == 2
    assert value("flagship_worker_live", worker=brokers.far[0].node, pool="analytics_pool") == 1


def test_the_demo_runs_across_both_brokers(brokers: TwoBrokers, tmp_path: Path) -> None:
    done = brokers.run_cli("demo", "--json", "--stack", "external")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    sessions = {s["name"]: s for s in report["sessions"]}
    far_nodes = {w.node for w in brokers.far if w.pool == "analytics_pool"}
    near_nodes = {w.node for w in brokers.near}
    assert sessions["analytics"]["worker"] in far_nodes and report["analytics"]["worker"] in far_nodes
    assert {sessions[n]["worker"] for n in ("triage_1", "triage_2", "rlm")} <= near_nodes
    assert [(t["category"], t["urgency"]) for t in report["triage"]] == [(c, u) for _, _, c, u in TICKETS]
    assert report["rlm"]["status"] == "ok" and report["rlm"]["answer"]
    scores = [t["score"] for t in report["triage"]]
    assert report["analytics"]["mean"] == pytest.approx(float(np.mean(scores)))
    assert report["holdout"]["category"] == "billing"
    assert all(report["history"][n]["entries"] for n in ("triage_1", "triage_2"))
    assert report["rehydrations"] == []
