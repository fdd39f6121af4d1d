"""A live worker whose broker connections drop runs nothing twice, and its strict session stays in order.

kombu, on a lost connection, puts every delivered un-acked message back on its queue, running
``acks_late`` calls included; the same worker then took them again (``c1, c1, c2, c2, c3, c3``).
A flagship worker keeps them recorded un-acked instead and runs each once (``routing.broker.transport``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from broker_proxy import BrokerProxy
from custom_workers import spawn_worker
from helpers import wait_until

from routing import Client, Session, names
from tasks.local.stack import Stack, WorkerProcess

POOL = "blip_pool"


@pytest.fixture(scope="module")
def proxied_worker(stack: Stack) -> Iterator[tuple[BrokerProxy, WorkerProcess]]:
    port = urlsplit(stack.redis_url).port
    assert port is not None
    proxy = BrokerProxy(port)
    worker = spawn_worker(stack, POOL, f"blip-{uuid.uuid4().hex[:6]}",
                          env={"REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"})
    stack.wait_ready([worker])
    yield proxy, worker
    worker.stop()
    proxy.close()


def _executions(client: Client, markers: set[str]) -> list[str]:
    entries = (json.loads(raw) for raw in client.redis.lrange(names.EXECUTIONS_KEY, -2000, -1))
    return [e["marker"] for e in entries if e["marker"] in markers]


def _reruns(client: Client) -> int:
    return int(client.redis.hget(names.STATS_KEY, "reruns") or 0)


def test_a_dropped_connection_mid_call_runs_every_call_once_and_in_order(
    client: Client, sessions: Callable[..., Session], proxied_worker: tuple[BrokerProxy, WorkerProcess],
) -> None:
    proxy, worker = proxied_worker
    session = sessions(POOL, node=worker.node)
    run = uuid.uuid4().hex[:6]
    markers = [f"{run}-c{i}" for i in range(1, 4)]
    reruns = _reruns(client)
    first = session.submit("record", marker=markers[0], sleep_s=4)
    rest = [session.submit("record", marker=m) for m in markers[1:]]
    wait_until(lambda: _executions(client, set(markers)) == markers[:1], timeout_s=30, what="c1 running")
    wait_until(lambda: client.redis.llen(names.worker_queue(worker.node)) == 0, timeout_s=10,
               what="c2 and c3 held by the worker")
    proxy.drop()  # every connection of the worker (consumer, result store, heartbeat, pulse) cut once

    assert [f.result(60)["marker"] for f in [first, *rest]] == markers
    assert session.call("record", marker=f"{run}-after", timeout_s=30)["node"] == worker.node  # it serves on
    assert _executions(client, {*markers, f"{run}-after"}) == [*markers, f"{run}-after"]
    assert _reruns(client) == reruns
    assert worker.proc.poll() is None
