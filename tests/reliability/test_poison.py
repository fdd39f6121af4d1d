"""Poison messages: every malformed shape, pushed raw to a shared and to a direct queue, is dead-lettered.

The worker that pops it keeps serving (same process, a normal call succeeds right
after), the dead-letter list holds one entry with the reason and the raw payload,
and a call named by the message fails with ``DeadLettered`` instead of hanging.
A call delivered ``FLAGSHIP_MAX_DELIVERIES`` times is dead-lettered, not moved or run.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery
from helpers import wait_until
from kombu import Connection
from kombu.transport import redis as kombu_redis

from routing import Client, Session, names
from routing.broker.celery_config import (
    SENTINEL_TRANSPORT,
    SHARED_CLIENT_TRANSPORT,
    TLS_TRANSPORT,
    RedisTransport,
    celery_config,
)
from routing.broker.deadletter import COUNTER, DELIVERIES_HEADER, DeadLetterSettings, summary
from routing.broker.envelope import UNACKED_KEY
from routing.broker.transport import GuardedChannel, SentinelTransport
from routing.errors import DeadLettered
from routing.fleet.reaper import reap_dead_workers
from routing.settings import Settings
from tasks.local.stack import Stack, WorkerProcess

POOL = "poison_pool"
MAX_DELIVERIES = DeadLetterSettings().max_deliveries


@pytest.fixture(scope="module")
def poison_worker(stack: Stack) -> Iterator[WorkerProcess]:
    """One worker for the whole catalogue: each case also proves it survived the ones before."""
    worker = stack.start_worker(POOL)
    yield worker
    worker.stop()


def real_envelope(client: Client, args: list[Any], queue: str, task: str = names.CALL_TASK) -> dict[str, Any]:
    """An envelope for ``queue`` as a producer's Celery writes it (sent to a queue nobody consumes, taken back)."""
    scratch = f"poison.scratch.{uuid.uuid4().hex}"
    client.app.send_task(task, args=args, queue=scratch, task_id=str(uuid.uuid4()))
    raw = client.redis.rpop(scratch)
    assert raw is not None
    envelope = dict(json.loads(raw))
    envelope["properties"]["delivery_info"].update(exchange=queue, routing_key=queue)
    return envelope


def ping_args(session_id: str = "poison-session") -> list[Any]:
    return [session_id, "ping", {}, {"affinity": "hint", "node": None}]


def with_body(envelope: dict[str, Any], body: bytes) -> dict[str, Any]:
    envelope["body"] = base64.b64encode(body).decode()
    return envelope


def without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(envelope: dict[str, Any]) -> dict[str, Any]:
        del envelope[key]
        return envelope
    return edit


def header(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(envelope: dict[str, Any]) -> dict[str, Any]:
        if value is None:
            del envelope["headers"][name]
        else:
            envelope["headers"][name] = value
        return envelope
    return edit


def call_args(args: list[Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda envelope: with_body(envelope, json.dumps([args, {}, {}]).encode())


@dataclass(frozen=True)
class Shape:
    name: str
    #: What the reason must say.
    reason: str
    #: Edits a real envelope (which carries a task id); None: ``raw`` is the whole item.
    edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    raw: Callable[[str], str] | None = None
    #: Whether the message still names its task id (then its call fails with DeadLettered).
    names_task_id: bool = True


ROUTE = {"affinity": "hint", "node": None}
PICKLE = "application/x-python-serialize"  # never unpickled: JSON is the only accepted content
CATALOGUE = [
    Shape("item_not_json", "not JSON", raw=lambda marker: f"this is not JSON {marker}", names_task_id=False),
    Shape("envelope_is_a_list", "JSON list", raw=lambda marker: json.dumps([marker, 1, 2]), names_task_id=False),
    Shape("envelope_is_a_string", "JSON str", raw=lambda marker: json.dumps(marker), names_task_id=False),
    Shape("envelope_without_properties", "no properties", without("properties")),
    Shape("envelope_without_body", "no body", without("body")),
    Shape("envelope_without_headers", "no headers", without("headers"), names_task_id=False),
    Shape("body_not_base64", "not valid base64", lambda e: {**e, "body": "abcde"}),
    Shape("body_not_json", "body is not valid application/json", lambda e: with_body(e, b"{not json")),
    Shape("body_declared_pickle", "ContentDisallowed", lambda e: {**e, "content-type": PICKLE}),
    Shape("body_an_object_not_args_kwargs_embed", "[args, kwargs, embed]", lambda e: with_body(e, b'{"x": 1}')),
    Shape("headers_without_task_id", "no task id", header("id", None), names_task_id=False),
    Shape("headers_without_task_name", "name no task", header("task", None)),
    Shape("headers_naming_an_unknown_task", "unknown task", header("task", "no.such.task")),
    Shape("call_session_id_not_a_string", "'session_id'", call_args([123, "ping", {}, ROUTE])),
    Shape("call_op_not_a_string", "'op'", call_args(["poison-session", ["ping"], {}, ROUTE])),
    Shape("call_kwargs_not_an_object", "'kwargs'", call_args(["poison-session", "ping", [1], ROUTE])),
    Shape("call_route_not_an_object", "'route'", call_args(["poison-session", "ping", {}, "hint"])),
    Shape("call_too_few_arguments", "do not match", call_args(["poison-session", "ping"])),
    Shape("call_too_many_arguments", "do not match", call_args(["poison-session", "ping", {}, ROUTE, 5])),
]


def entries_with(client: Client, marker: str) -> list[dict[str, Any]]:
    return [e for raw in client.redis.lrange(names.DEADLETTER_KEY, 0, -1) if marker in (e := json.loads(raw))["raw"]]


def assert_still_serving(worker: WorkerProcess, sessions: Callable[..., Session]) -> None:
    assert worker.alive(), worker.log_tail()
    reply = sessions(POOL).call("ping", timeout_s=30)
    assert reply["pid"] == worker.pid and reply["node"] == worker.node


def assert_call_failed_dead_lettered(client: Client, task_id: str, waiting: Future[Any], reason: str) -> None:
    with pytest.raises(DeadLettered) as raised:
        waiting.result(30)
    assert raised.value.task_id == task_id and reason in raised.value.reason
    stored = json.loads(client.redis.get(f"celery-task-meta-{task_id}"))  # as Celery's Redis backend stores one
    assert stored["status"] == "FAILURE" and stored["task_id"] == task_id
    assert stored["result"]["exc_type"] == "DeadLettered" and stored["result"]["exc_message"][0] == task_id


@pytest.mark.parametrize("queue_kind", ["shared", "direct"])
@pytest.mark.parametrize("shape", CATALOGUE, ids=[s.name for s in CATALOGUE])
def test_a_malformed_message_is_dead_lettered_and_the_worker_keeps_serving(
    shape: Shape, queue_kind: str, poison_worker: WorkerProcess, client: Client, sessions: Callable[..., Session]
) -> None:
    queue = names.pool_queue(POOL) if queue_kind == "shared" else names.worker_queue(poison_worker.node)
    marker = f"poison-{uuid.uuid4().hex}"
    task_id = None
    if shape.raw is not None:
        item = shape.raw(marker)
    else:
        assert shape.edit is not None
        envelope = real_envelope(client, ping_args(), queue)
        task_id = envelope["headers"]["id"]
        envelope = shape.edit(copy.deepcopy(envelope))
        envelope["marker"] = marker  # kombu ignores unknown keys; the raw payload keeps it
        item = json.dumps(envelope)
    waiting = client.results.expect(task_id) if task_id and shape.names_task_id else None
    before = int(client.redis.hget(names.STATS_KEY, COUNTER) or 0)

    client.redis.lpush(queue, item)

    found = wait_until(lambda: entries_with(client, marker), timeout_s=30, what=f"{shape.name} dead-lettered")
    assert_still_serving(poison_worker, sessions)
    [entry] = entries_with(client, marker)  # once: no redelivery loop
    assert shape.reason in entry["reason"], entry["reason"]
    assert entry["queue"] == queue and entry["node"] and entry["raw_size"] >= len(marker)
    assert entry["task_id"] == (task_id if shape.names_task_id else None)
    assert found and int(client.redis.hget(names.STATS_KEY, COUNTER) or 0) == before + 1
    assert client.redis.llen(queue) == 0
    if waiting is not None:
        assert task_id is not None
        assert_call_failed_dead_lettered(client, task_id, waiting, shape.reason)


def test_a_malformed_broadcast_on_celerys_control_channel_does_not_stop_the_worker(
    poison_worker: WorkerProcess, client: Client, sessions: Callable[..., Session]
) -> None:
    for junk in ("[1, 2]", '{"properties": 5}', '"text"'):
        assert client.redis.publish("/0.celery.pidbox", junk) >= 1  # the worker's control consumer listens
    assert_still_serving(poison_worker, sessions)
    assert client.app.control.ping([poison_worker.node], timeout=10)  # remote control still answers


def test_a_call_delivered_max_times_is_dead_lettered_by_the_worker_not_run(
    poison_worker: WorkerProcess, client: Client, sessions: Callable[..., Session]
) -> None:
    direct = names.worker_queue(poison_worker.node)
    envelope = real_envelope(client, ping_args(), direct)
    task_id = envelope["headers"]["id"]
    envelope["headers"][DELIVERIES_HEADER] = MAX_DELIVERIES
    waiting = client.results.expect(task_id)
    client.redis.lpush(names.worker_queue(poison_worker.node), json.dumps(envelope))
    assert_call_failed_dead_lettered(client, task_id, waiting, f"delivered {MAX_DELIVERIES} times")
    assert_still_serving(poison_worker, sessions)
    # One delivery short of the limit, a call simply runs.
    envelope = real_envelope(client, ping_args(sessions(POOL).id), direct)
    envelope["headers"][DELIVERIES_HEADER] = MAX_DELIVERIES - 1
    running = client.results.expect(envelope["headers"]["id"])
    client.redis.lpush(names.worker_queue(poison_worker.node), json.dumps(envelope))
    assert running.result(30)["value"]["pid"] == poison_worker.pid


def test_the_reaper_dead_letters_a_taken_call_at_the_delivery_limit_instead_of_requeueing_it(client: Client) -> None:
    """A dead worker's un-acked calls: one more delivery is counted; at the limit, dead-lettered."""
    node, pool = names.qualify_node(f"poison-dead-{uuid.uuid4().hex[:6]}"), f"poison_reaped_{uuid.uuid4().hex[:6]}"
    direct = names.worker_queue(node)
    doomed, spared = real_envelope(client, ping_args(), direct), real_envelope(client, ping_args(), direct)
    doomed["headers"][DELIVERIES_HEADER] = MAX_DELIVERIES - 1
    tags = {}
    for envelope in (doomed, spared):
        tags[envelope["headers"]["id"]] = tag = envelope["properties"]["delivery_tag"]
        client.redis.hset(UNACKED_KEY, tag, json.dumps([envelope, direct, direct]))
    # A registered worker, gone without a heartbeat, that held both.
    client.redis.hset(names.worker_key(node), mapping={"node": node, "pool": pool})
    client.redis.hset(names.DIRECT_QUEUES_KEY, node, pool)
    waiting = client.results.expect(doomed["headers"]["id"])

    moved = reap_dead_workers(client.redis, pool)

    assert moved == {node: 1}
    assert_call_failed_dead_lettered(client, doomed["headers"]["id"], waiting, f"delivered {MAX_DELIVERIES} times")
    assert not any(client.redis.hexists(UNACKED_KEY, tag) for tag in tags.values())
    [requeued] = [json.loads(raw) for raw in client.redis.lrange(names.pool_queue(pool), 0, -1)]
    assert requeued["headers"]["id"] == spared["headers"]["id"]
    assert requeued["headers"][DELIVERIES_HEADER] == 1 and requeued["headers"]["redelivered"] is True
    [entry] = entries_with(client, doomed["headers"]["id"])
    assert entry["task_id"] == doomed["headers"]["id"] and entry["queue"] == direct
    client.redis.delete(names.pool_queue(pool))


@pytest.mark.parametrize("by_visibility_timeout", [True, False])
def test_only_a_visibility_timeout_restore_counts_the_delivery(client: Client, by_visibility_timeout: bool) -> None:
    """Back by the visibility timeout (its worker died or hung): one more delivery that did not complete.
    Back by ``restore_by_tag`` alone (a broker connection drop, a warm shutdown): the call never failed."""
    queue = f"poison.restore.{uuid.uuid4().hex}"
    envelope = real_envelope(client, ping_args(), queue)
    envelope["headers"][DELIVERIES_HEADER] = 1
    tag = envelope["properties"]["delivery_tag"]
    client.redis.hset(UNACKED_KEY, tag, json.dumps([envelope, "", queue]))
    client.redis.zadd(UNACKED_KEY + "_index", {tag: time.time() - 10})
    with Connection(client.redis_url, transport=RedisTransport,
                    transport_options={"visibility_timeout": 5}) as connection:
        qos = connection.default_channel.qos
        if by_visibility_timeout:
            qos.restore_visible(num=100, interval=1)
        else:
            qos.restore_by_tag(tag)
    restored = json.loads(client.redis.rpop(queue))
    assert restored["headers"]["id"] == envelope["headers"]["id"]
    assert restored["headers"][DELIVERIES_HEADER] == (2 if by_visibility_timeout else 1)
    assert restored["headers"]["redelivered"] is True
    assert not client.redis.hexists(UNACKED_KEY, tag)


def test_the_reaper_dead_letters_an_unparseable_item_from_a_dead_workers_queue_and_finishes(client: Client) -> None:
    node, pool = names.qualify_node(f"poison-dead-{uuid.uuid4().hex[:6]}"), f"poison_reaped_{uuid.uuid4().hex[:6]}"
    marker = f"not JSON at all {uuid.uuid4().hex}"
    client.redis.lpush(names.worker_queue(node), marker)
    client.redis.hset(names.DIRECT_QUEUES_KEY, node, pool)
    assert reap_dead_workers(client.redis, pool) == {node: 0}
    [entry] = entries_with(client, marker)
    assert entry["reason"].startswith("item is not JSON") and entry["queue"] == names.worker_queue(node)
    assert client.redis.llen(names.pool_queue(pool)) == 0 and client.redis.llen(names.worker_queue(node)) == 0


def test_status_shows_the_dead_letter_count_and_newest_entries(
    poison_worker: WorkerProcess, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = f"poison-{uuid.uuid4().hex}"
    client.redis.lpush(names.pool_queue(POOL), f"status check {marker}")
    wait_until(lambda: entries_with(client, marker), timeout_s=30, what="dead-lettered")
    held = summary(client.redis)
    assert held["held"] >= 1 and held["total"] >= held["held"]
    assert held["recent"][0]["reason"].startswith("item is not JSON")

    from tasks.local.status_view import render_status

    render_status(as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data["deadletter"]["held"] == client.redis.llen(names.DEADLETTER_KEY)
    assert data["deadletter"]["recent"][0]["queue"] == names.pool_queue(POOL)
    assert "raw" not in data["deadletter"]["recent"][0]  # payloads stay in Redis
    render_status(as_json=False)
    text = capsys.readouterr().out
    assert "dead letters" in text and "item is not JSON" in text


def test_the_poison_proof_transport_serves_redis_rediss_and_sentinel_urls() -> None:
    settings = Settings()
    assert celery_config(settings, "redis://localhost:6379/0")["broker_transport"] == SHARED_CLIENT_TRANSPORT
    assert celery_config(settings, "rediss://localhost:6380/0")["broker_transport"] == TLS_TRANSPORT
    config = celery_config(settings, "sentinel://localhost:26379;sentinel://localhost:26380/0")
    assert config["broker_transport"] == SENTINEL_TRANSPORT
    assert config["broker_transport_options"]["master_name"] == "mymaster"
    assert config["result_backend_transport_options"]["master_name"] == "mymaster"
    channel = SentinelTransport.Channel  # the same guard over Sentinel
    assert issubclass(channel, GuardedChannel) and issubclass(channel, kombu_redis.SentinelChannel)


@pytest.mark.parametrize("url", ["rediss://:pw@localhost:6380/0", "rediss://:pw@localhost:6380/0?ssl_cert_reqs=none"])
def test_a_rediss_broker_on_the_poison_proof_transport_still_speaks_tls(url: str) -> None:
    app = Celery("poison-tls", set_as_current=False)
    app.conf.update(broker_url=url, broker_transport=TLS_TRANSPORT)  # even without celery_config's URL options
    connection = app.connection_for_write()
    channel = connection.transport.Channel.__new__(connection.transport.Channel)
    channel.connection = connection.transport
    params = channel._connparams()
    assert params["connection_class"] is redis_lib.SSLConnection
    assert params["ssl_cert_reqs"] == (ssl.CERT_NONE if "none" in url else ssl.CERT_REQUIRED)
