"""Faults inside recovery, against real workers and the real server.

A dead worker's direct queue and un-acked deliveries holding items that are not UTF-8
or are nested too deep: the producer's sweep and the reap complete, the bad items are
dead-lettered, the good ones around them move and run in their send order, ahead of
calls sent later. Calls the sweep resends go to the head in their send order too. A
session call carrying an ``eta`` fails typed and its session keeps serving. A drain
script whose reply is lost gives its burst back to the head of the queue at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis as redis_lib
from broker_proxy import BrokerProxy
from helpers import wait_until

from routing import Client, Session, names
from routing.broker.drain import no_rpop_count
from routing.broker.envelope import UNACKED_INDEX_KEY, UNACKED_KEY, configure_unacked_keys
from routing.errors import DeadLettered
from routing.fleet.reaper import reap_dead_workers
from routing.producer.binding import Waiting
from routing.producer.recovery.whereabouts import locate
from tasks.local.stack import Stack, WorkerProcess

POOL = "recovery_pool"
#: Deeper than Python's JSON decoder recurses (a RecursionError, not a ValueError).
TOO_DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    """One worker of one thread: calls run in the order it pops them."""
    worker = stack.start_worker(POOL)
    yield worker
    worker.stop()


def executed(client: Client, markers: list[str]) -> list[str]:
    """``markers`` in the order their calls ran (``record`` appends to ``names.EXECUTIONS_KEY``)."""
    entries = [json.loads(raw)["marker"] for raw in client.redis.lrange(names.EXECUTIONS_KEY, -2000, -1)]
    return [marker for marker in entries if marker in markers]


def dead_letters(client: Client, marker: str) -> list[dict[str, Any]]:
    return [e for raw in client.redis.lrange(names.DEADLETTER_KEY, 0, -1) if marker in (e := json.loads(raw))["raw"]]


@dataclass
class Call:
    """A ``record(marker)`` hint call built as the router sends it, and the future the client settles."""

    marker: str
    envelope: dict[str, Any]
    future: Future[Any]

    @property
    def task_id(self) -> str:
        return str(self.envelope["headers"]["id"])

    @property
    def raw(self) -> str:
        return json.dumps(self.envelope)


def call(client: Client, session: Session, marker: str, queue: str, sent_at: float) -> Call:
    """A call for ``queue`` (built in a queue nobody reads), waited for like any hint call the client sent."""
    route = {"node": None, "pool": POOL, "affinity": "hint", "ttl_s": session.ttl_s, "incarnation": None,
             "sent_at": sent_at}
    args = [session.id, "record", {"marker": marker}, route]
    task_id, hold = str(uuid.uuid4()), f"recovery.hold.{uuid.uuid4().hex}"
    future = client.results.expect(task_id, Waiting(session.id, False, None, None, POOL, args))
    client.app.send_task(names.CALL_TASK, args=args, queue=hold, task_id=task_id, declare=[])
    raw = client.redis.rpop(hold)
    assert raw is not None
    envelope: dict[str, Any] = json.loads(raw)
    envelope["properties"]["delivery_info"].update(exchange="", routing_key=queue)
    return Call(marker, envelope, future)


def occupy(client: Client, sessions: Callable[..., Session], sleep_s: float) -> Future[Any]:
    """Keep the pool's one thread busy for ``sleep_s``: what is queued meanwhile waits, in order."""
    marker = f"busy-{uuid.uuid4().hex[:8]}"
    future = sessions(POOL).submit("record", marker=marker, sleep_s=sleep_s)
    wait_until(lambda: executed(client, [marker]), timeout_s=15, what="the busy call started")
    return future  # type: ignore[return-value]


def test_bad_items_of_a_dead_worker_are_dead_lettered_and_the_rest_run_in_send_order(
        client: Client, sessions: Callable[..., Session], worker: WorkerProcess) -> None:
    session = sessions(POOL)
    run = uuid.uuid4().hex[:8]
    node = names.qualify_node(f"recovery-dead-{run}")
    direct = names.worker_queue(node)
    t0 = time.time() - 60
    busy = occupy(client, sessions, 2.5)  # the setup and the reap take milliseconds

    # Un-acked by the dead worker: two calls sent first (recorded in reverse), two entries that cannot be read.
    u1, u2 = (call(client, session, f"u{i}-{run}", direct, t0 + i) for i in (1, 2))
    for taken in (u2, u1):
        tag = taken.envelope["properties"]["delivery_tag"]
        client.redis.hset(UNACKED_KEY, tag, json.dumps([taken.envelope, "", direct]))
        client.redis.zadd(UNACKED_INDEX_KEY, {tag: time.time()})
    bad_tags = [f"bad-utf8-{run}", f"bad-deep-{run}"]
    client.redis.hset(UNACKED_KEY, bad_tags[0], b'[{"m": "\xff ua-' + run.encode() + b'"},"","' + direct.encode()
                      + b'"]')
    client.redis.hset(UNACKED_KEY, bad_tags[1], f'[{{"m": "ud-{run}", "x": {TOO_DEEP}}},"","{direct}"]')
    # Queued for it, sent later, with bad items around them; then a call sent after all, in the shared queue.
    q3, q4 = (call(client, session, f"q{i}-{run}", direct, t0 + i) for i in (3, 4))
    for item in (q3.raw, b"\xff\xfe qa-" + run.encode(), q4.raw, f'{{"m": "qd-{run}", "x": {TOO_DEEP}}}'):
        client.redis.lpush(direct, item)
    later = call(client, session, f"later-{run}", names.pool_queue(POOL), t0 + 5)
    client.redis.lpush(names.pool_queue(POOL), later.raw)
    client.redis.hset(names.worker_key(node), mapping={"node": node, "pool": POOL})
    client.redis.hset(names.DIRECT_QUEUES_KEY, node, POOL)
    calls = [u1, u2, q3, q4, later]

    where = locate(client.redis, POOL, {c.task_id for c in calls})  # the sweep's look reads past every bad item
    assert where.queued == {q3.task_id, q4.task_id, later.task_id} and set(where.unacked) == {u1.task_id, u2.task_id}
    assert client.sweep.sweep(POOL) >= 0  # a whole sweep pass over the pool completes too
    reap_dead_workers(client.redis, POOL)  # what a peer's housekeeping or a producer's watch does

    for c in calls:
        c.future.result(30)
    busy.result(30)
    assert executed(client, [c.marker for c in calls]) == [c.marker for c in calls]  # in send order, moved first
    for marker, reason in ((f"ua-{run}", "un-acked entry"), (f"ud-{run}", "un-acked entry"),
                           (f"qa-{run}", "UnicodeDecodeError"), (f"qd-{run}", "RecursionError")):
        [entry] = dead_letters(client, marker)
        assert reason in entry["reason"] and entry["queue"] == direct
    assert not any(client.redis.hexists(UNACKED_KEY, tag) for tag in bad_tags)
    assert client.redis.llen(direct) == 0 and not client.redis.exists(names.worker_key(node))  # the reap finished


def test_calls_the_sweep_resends_go_to_the_head_in_their_send_order(
        client: Client, sessions: Callable[..., Session], worker: WorkerProcess) -> None:
    """Calls lost in a dead worker's pop window (in no queue, not un-acked) run before calls sent after them."""
    session = sessions(POOL)
    run = uuid.uuid4().hex[:8]
    t0 = time.time() - 60
    resent_before = int(client.redis.hget(names.STATS_KEY, "resent") or 0)
    busy = occupy(client, sessions, 4.0)
    lost = {i: call(client, session, f"lost{i}-{run}", names.pool_queue(POOL), t0 + i) for i in (3, 1, 2)}
    later = call(client, session, f"later-{run}", names.pool_queue(POOL), t0 + 4)
    client.redis.lpush(names.pool_queue(POOL), later.raw)

    def resent() -> bool:
        client.sweep.sweep(POOL)  # nowhere twice, lost_grace_s apart: sent again
        return int(client.redis.hget(names.STATS_KEY, "resent") or 0) >= resent_before + 3

    wait_until(resent, timeout_s=10, interval_s=0.2, what="the lost calls resent")
    calls = [lost[1], lost[2], lost[3], later]
    for c in calls:
        c.future.result(30)
    busy.result(30)
    assert executed(client, [c.marker for c in calls]) == [c.marker for c in calls]


@pytest.mark.parametrize("delay", ["eta", "countdown"])
def test_a_session_call_with_an_eta_fails_typed_and_the_session_keeps_serving(
        client: Client, sessions: Callable[..., Session], delay: str) -> None:
    session = sessions("triage_pool")  # strict: its calls take the session's turn one at a time
    session.call("ping", timeout_s=30)
    node = session.worker
    assert node is not None
    route = {"node": node, "pool": "triage_pool", "affinity": "strict_queue", "ttl_s": session.ttl_s,
             "incarnation": client.redis.hget(names.worker_key(node), "incarnation"), "sent_at": time.time()}
    task_id = str(uuid.uuid4())
    waiting = client.results.expect(task_id)
    when = {"eta": datetime.now(UTC) + timedelta(days=1)} if delay == "eta" else {"countdown": 86_400}
    client.app.send_task(names.CALL_TASK, args=[session.id, "ping", {}, route], queue=names.worker_queue(node),
                         task_id=task_id, **when)

    with pytest.raises(DeadLettered) as raised:
        waiting.result(30)
    assert raised.value.task_id == task_id and "eta" in raised.value.reason
    assert [session.call("ping", timeout_s=10)["node"] for _ in range(3)] == [node] * 3


def test_the_lua_wording_of_a_missing_rpop_count_turns_draining_off(stack: Stack) -> None:
    """Redis < 6.2 tells a script "Wrong number of args calling Redis command From Lua script"; this server's
    wording of the same error from a script, and a client's, are recognised too."""
    assert no_rpop_count(redis_lib.ResponseError("Wrong number of args calling Redis command From Lua script"))
    with pytest.raises(redis_lib.ResponseError) as from_script:
        stack.redis.eval("return redis.call('RPOP')", 0)
    assert no_rpop_count(from_script.value)
    with pytest.raises(redis_lib.ResponseError) as from_client:
        stack.redis.execute_command("RPOP")
    assert no_rpop_count(from_client.value)


def test_a_drain_whose_reply_is_lost_gives_its_burst_back_to_the_head_at_once(stack: Stack) -> None:
    """The script ran (the burst popped and recorded un-acked), its reply and its retry's reply were lost: the next
    channel (the consumer reconnecting) puts all of it back at the head, in order, instead of after an hour."""
    from kombu import Connection, Consumer, Queue

    from routing.broker.scripts import source
    from routing.broker.transport import SHARED_CLIENT_TRANSPORT

    queue = names.worker_queue(f"recovery-drain-{uuid.uuid4().hex[:8]}@test")
    stack.redis.script_load(source("drain_direct_queue"))  # loaded: the lost reply is the script's, not NOSCRIPT's
    url = urlsplit(stack.redis_url)
    proxy = BrokerProxy(url.port or 6379)
    seen: list[Any] = []
    try:
        with Connection(url._replace(netloc=f"{url.hostname}:{proxy.port}").geturl(),
                        transport=SHARED_CLIENT_TRANSPORT) as conn:
            conn.default_channel.basic_qos(0, 10, False)
            with conn.Producer() as producer:
                for n in range(6):
                    producer.publish({"n": n}, routing_key=queue, declare=[Queue(queue)], serializer="json")
            with Consumer(conn, [Queue(queue)], callbacks=[lambda body, message: seen.append(body)], accept=["json"]):
                proxy.swallow_reply(b"EVALSHA", count=2)  # the call (and a retry, if redis-py makes one)
                with pytest.raises(redis_lib.ConnectionError):
                    conn.drain_events(timeout=5)
            assert seen == [] and proxy.swallowed >= 1 and stack.redis.llen(queue) == 0
            assert sum(queue in raw for raw in stack.redis.hvals(UNACKED_KEY)) == 6  # recorded, undelivered
    finally:
        proxy.close()

    with Connection(stack.redis_url, transport=SHARED_CLIENT_TRANSPORT) as conn:
        conn.default_channel.basic_qos(0, 10, False)  # a new channel: the burst goes back
        assert not any(queue in raw for raw in stack.redis.hvals(UNACKED_KEY))
        assert stack.redis.llen(queue) == 6
        with Consumer(conn, [Queue(queue)], callbacks=[lambda body, message: (seen.append(body), message.ack())],
                      accept=["json"]):
            while len(seen) < 6:
                conn.drain_events(timeout=5)
    assert [body["n"] for body in seen] == list(range(6))  # the oldest first, as sent


def test_recovery_reads_the_unacked_keys_the_transport_options_name(
        client: Client, stack: Stack, sessions: Callable[..., Session], worker: WorkerProcess) -> None:
    """A broker configured with its own ``unacked_key``/``unacked_index_key``: the reaper and the sweep look there."""
    run = uuid.uuid4().hex[:8]
    options = {"unacked_key": f"recovery.unacked.{run}", "unacked_index_key": f"recovery.unacked_index.{run}"}
    node, pool = names.qualify_node(f"recovery-keys-{run}"), f"recovery_keys_{run}"
    direct = names.worker_queue(node)
    taken = call(client, sessions(POOL), f"keys-{run}", direct, time.time())
    tag = taken.envelope["properties"]["delivery_tag"]
    stack.redis.hset(options["unacked_key"], tag, json.dumps([taken.envelope, "", direct]))
    stack.redis.zadd(options["unacked_index_key"], {tag: time.time()})
    stack.redis.hset(names.DIRECT_QUEUES_KEY, node, pool)
    stack.redis.hset(names.worker_key(node), mapping={"node": node, "pool": pool})
    try:
        assert configure_unacked_keys(options).hash == options["unacked_key"]
        assert locate(stack.redis, pool, {taken.task_id}).unacked == {taken.task_id: tag}
        assert reap_dead_workers(stack.redis, pool) == {node: 1}
    finally:
        configure_unacked_keys(None)
    [moved] = [json.loads(raw) for raw in stack.redis.lrange(names.pool_queue(pool), 0, -1)]
    assert moved["headers"]["id"] == taken.task_id and not stack.redis.exists(*options.values())
    stack.redis.delete(names.pool_queue(pool))
