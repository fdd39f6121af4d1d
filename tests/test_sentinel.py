"""Sentinel failover with nothing lost: a real primary, a replica and three sentinels on loopback.

Workers of a strict and a hint pool and a producer all reach Redis through a
``sentinel://`` URL. Calls run continuously from strict and hint sessions while the
primary is killed (-9) and a sentinel promotes the replica. Then: every call the
producer acknowledged settles within the failover bound (none lost, none hung),
each completed call has its value, strict sessions keep their worker, new sessions
bind, and ``flagship status --json`` names the new primary.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from helpers import wait_until
from sentinel_cluster import SentinelCluster

from routing import Client, Session, Settings, names
from routing.broker.celery_config import celery_config
from routing.broker.connect import (
    SentinelAddress,
    SentinelOptions,
    execute_replicated,
    follows_sentinel,
    parse_sentinel_url,
    primary_address,
    redis_client,
    server_address,
)
from routing.errors import CallTimeout, FlagshipError
from routing.fleet import pulse
from routing.producer.results.listener import ResultListener
from routing.producer.results.listener_backend import listener_backend_url
from routing.settings import redact_url
from tasks.local.stack import Stack

STRICT_POOL, HINT_POOL = "sentinel_strict_pool", "sentinel_hint_pool"
#: Every call acknowledged to the producer settles within this long of the kill.
FAILOVER_BOUND_S = 40.0
#: Workers must stay live across the failover: their heartbeat TTL outlasts Sentinel's
#: down-after (1 s) plus the election (~1-2 s) plus reconnecting.
SENTINEL_ENV = {"FLAGSHIP_HEARTBEAT_TTL_S": "8", "FLAGSHIP_HEARTBEAT_INTERVAL_S": "0.4"}


@dataclasses.dataclass
class Call:
    session: Session
    sent_at: float
    future: Future[Any]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    c = SentinelCluster(tmp_path / "sentinel")
    c.workdir.mkdir()
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def sentinel_stack(flagship_env: dict[str, str], cluster: SentinelCluster,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    for key, value in SENTINEL_ENV.items():
        monkeypatch.setenv(key, value)
    settings = dataclasses.replace(Settings.from_env(), redis_url=cluster.url)
    stack = Stack(settings, env=SENTINEL_ENV)
    try:
        workers = [stack.start_worker(pool, wait=False) for pool in (STRICT_POOL, HINT_POOL) for _ in range(2)]
        stack.wait_ready(workers)
        yield stack
    finally:
        stack.stop()


class Traffic:
    """Calls from every session, a few in flight each, until stopped; refused sends are retried."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sessions
        self.calls: list[Call] = []
        self.refused: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in sessions]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, session: Session) -> None:
        mine: list[Future[Any]] = []
        while not self._stop.is_set():
            mine = [f for f in mine if not f.done()]
            if len(mine) >= 2:
                time.sleep(0.01)
                continue
            try:
                future = session.submit("ping", sleep_s=0.05)
            except FlagshipError as exc:  # not acknowledged (the broker is changing hands): send again
                with self._lock:
                    self.refused.append(exc)
                time.sleep(0.1)
                continue
            mine.append(future)
            with self._lock:
                self.calls.append(Call(session, time.monotonic(), future))

    def first_success_after(self, t: float, timeout_s: float) -> float:
        """When the first call sent after ``t`` completed with a value (seconds after ``t``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                later = [c for c in self.calls if c.sent_at >= t]
            for call in later:
                if call.future.done() and call.future.exception() is None:
                    return time.monotonic() - t
            time.sleep(0.02)
        raise AssertionError(f"no call succeeded within {timeout_s} s of the kill")


@pytest.mark.slow
def test_a_killed_primary_loses_no_acknowledged_call_and_sessions_follow_the_new_primary(
    cluster: SentinelCluster, sentinel_stack: Stack
) -> None:
    settings = dataclasses.replace(Settings.from_env(), redis_url=cluster.url)
    client = Client(cluster.url, settings)
    try:
        strict = [client.session(STRICT_POOL), client.session(STRICT_POOL, rehydrate=True)]
        hint = [client.session(HINT_POOL), client.session(HINT_POOL)]
        bound = {s.id: s.worker for s in strict}
        lm = strict[1].lm(temperature=0.0)  # a recipe, replicated with WAIT before the kill
        replica = cluster.server("replica")  # session records and recipes are on the replica once written
        assert all(replica.exists(names.session_key(s.id)) for s in [*strict, *hint])
        assert replica.hexists(names.session_recipes_key(strict[1].id), lm.ref_id)
        assert primary_address(cluster.url) == cluster.address("primary")
        traffic = Traffic([*strict, *hint])
        traffic.start()
        time.sleep(1.5)  # calls in every state: queued, running, stored
        killed_at = time.monotonic()
        cluster.kill_primary()
        new_primary = cluster.wait_failover()
        promoted_s = time.monotonic() - killed_at
        first_s = traffic.first_success_after(killed_at, FAILOVER_BOUND_S)
        print(f"\nkill -9 of the primary -> replica promoted (seen by the test): {promoted_s:.2f} s, "
              f"first successful call: {first_s:.2f} s")
        time.sleep(2.0)  # more calls on the new primary
        traffic.stop()

        # No acknowledged call lost, none hung: every future settles within the bound.
        hung, failed, values = [], [], 0
        for call in traffic.calls:
            wait_s = max(0.1, killed_at + FAILOVER_BOUND_S - time.monotonic())
            try:
                reply = call.future.result(wait_s)
            except (TimeoutError, CallTimeout):
                hung.append(call)
            except FlagshipError as exc:
                failed.append((call.session.pool, exc))
            else:
                assert reply["node"], reply  # a completed call has its value
                values += 1
        print(f"calls: {len(traffic.calls)} acknowledged, {values} completed, {len(failed)} failed "
              f"with typed errors, {len(hung)} hung; sends refused during the failover (not acknowledged, "
              f"retried): {Counter(type(e).__name__ for e in traffic.refused)}")
        assert not hung, f"{len(hung)} acknowledged calls still pending {FAILOVER_BOUND_S} s after the kill"
        assert not failed, failed
        assert values == len(traffic.calls) and values > 50

        # Strict sessions keep their worker (or were rebuilt elsewhere when rehydrate=True); the recipe survived.
        assert strict[0].worker == bound[strict[0].id], "a strict session lost its worker"
        for session in strict:
            assert session.call("ping", timeout=30)["node"] == session.worker
        assert strict[1].predict("question -> answer", lm=lm)(question="2+2?", timeout=30)

        # New sessions bind, on both pools, on the new primary (it has no replica now: writes do not
        # wait for one each time, see routing.broker.connect.execute_replicated).
        for pool in (STRICT_POOL, HINT_POOL):
            started = time.monotonic()
            fresh = client.session(pool)
            assert fresh.call("ping", timeout=30)["node"] == fresh.worker
            assert time.monotonic() - started < 5.0
            fresh.close()
        assert primary_address(cluster.url) == new_primary

        # `flagship status --json` with the Sentinel URL names the new primary and sees all four workers.
        env = sentinel_stack.child_env({"REDIS_URL": cluster.url})
        out = subprocess.run([sys.executable, "-m", "tasks.cli", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["primary"] == new_primary
        print("reliability counters after the failover:", status["reliability"])
        live = {w["node"] for w in status["workers"] if w["live"]}
        assert {w.node for w in sentinel_stack.workers} <= live, status["workers"]
    finally:
        client.close()


def test_plain_urls_name_their_server_and_write_without_waiting_for_a_replica(stack: Stack) -> None:
    redis = redis_client(stack.redis_url, decode_responses=True)
    assert not follows_sentinel(redis)
    pipe = redis.pipeline(transaction=False)
    pipe.set("flagship:test:replicated", "1")
    pipe.get("flagship:test:replicated")
    assert execute_replicated(redis, pipe) == [True, "1"]  # no WAIT reply among them
    redis.delete("flagship:test:replicated")
    redis.close()
    assert server_address("redis://:pw@10.0.0.5:6380/0") == "10.0.0.5:6380"
    assert primary_address("redis://10.0.0.5:6380/0") is None


def test_sentinel_options_come_from_the_environment() -> None:
    options = SentinelOptions.from_env({"FLAGSHIP_SENTINEL_MASTER": "flag", "FLAGSHIP_SENTINEL_PASSWORD": "s3",
                                        "FLAGSHIP_SENTINEL_WAIT_MS": "250"})
    assert options == SentinelOptions("flag", "s3", 250)
    assert options.transport_options() == {"master_name": "flag", "sentinel_kwargs": {"password": "s3"}}
    assert SentinelOptions.from_env({}) == SentinelOptions("mymaster", None, 500)
    address = parse_sentinel_url("sentinel://:pw@h1:26379;sentinel://h2/3")
    assert address.sentinels == (("h1", 26379), ("h2", 26379)) and address.db == 3 and address.password == "pw"
    # Logs, status and Flower mask the password of every URL of the list.
    assert redact_url("sentinel://:pw@h1:26379;sentinel://:pw2@h2/3") == "sentinel://:***@h1:26379;sentinel://:***@h2/3"


def test_the_result_listener_says_when_it_is_back_and_still_settles_calls(stack: Stack) -> None:
    """What a failover looks like to the listener: its connection dropped, then a server again."""
    app = Celery("listener-test", set_as_current=False)
    app.conf.update(celery_config(Settings.from_env(), stack.redis_url))
    app.conf.result_backend = listener_backend_url(stack.redis_url)
    listener = ResultListener(app, stack.redis_url)
    back = threading.Event()
    listener.on_reconnect = back.set
    try:
        task_id = str(uuid.uuid4())
        future = listener.expect(task_id)
        wait_until(lambda: listener._home_confirms == 1, timeout_s=10, what="the listener's first subscription")
        assert not back.is_set()  # a first subscription is no reconnect
        port = listener._pubsub.connection._sock.getsockname()[1]
        redis = redis_client(stack.redis_url)
        assert redis.client_kill(f"127.0.0.1:{port}")
        assert back.wait(15), "the listener did not say it was back"
        app.backend.store_result(task_id, {"node": "n", "value": 42}, "SUCCESS")  # stored and published
        assert future.result(15) == {"node": "n", "value": 42}
        redis.delete(f"celery-task-meta-{task_id}")
        redis.close()
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["sentinel://h1:26379;sentinel://h2:26380/2", "sentinel://:pw@h1;sentinel://h2/0",
                                 "sentinel://user:p%40ss@h1:1;sentinel://h2:2;sentinel://h3:3"])
def test_the_pulse_reads_a_sentinel_url_as_routing_connect_does(url: str) -> None:
    """The pulse runs isolated (no ``routing`` import): it loads ``routing/broker/connect.py`` from its file."""
    client = pulse.connect(url, {"FLAGSHIP_SENTINEL_MASTER": "flag"}, 1.0)
    address = parse_sentinel_url(url)
    pool = client.connection_pool
    assert [tuple(s.connection_pool.connection_kwargs[k] for k in ("host", "port"))
            for s in pool.sentinel_manager.sentinels] == list(address.sentinels)
    assert SentinelAddress(address.sentinels, pool.connection_kwargs["db"], pool.connection_kwargs["username"],
                           pool.connection_kwargs["password"]) == address
    assert follows_sentinel(client) and client.connection_pool.service_name == "flag"
