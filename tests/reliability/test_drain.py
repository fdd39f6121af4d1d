"""A burst in a worker's own queue is drained in one step: popped and recorded un-acked together.

The worker is stopped (SIGSTOP) while a strict session's calls and two malformed
messages pile up in its queue, then resumed: the calls run once each, in order;
the malformed ones are dead-lettered and leave no un-acked entry behind; the
drain script ran (the server counts its ``RPOP``); nothing stays un-acked.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

from routing import Client, names
from routing.broker.deadletter import COUNTER
from routing.broker.envelope import UNACKED_INDEX_KEY, UNACKED_KEY
from tasks.local.stack import Stack, WorkerProcess

POOL = "drain_pool"


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = stack.start_worker(POOL)
    yield worker
    worker.stop()


def _malformed(client: Client, queue: str, edit: Any) -> tuple[bytes, str]:
    """A real envelope for ``queue`` (as a producer's Celery writes it), edited; returns it and its tag."""
    scratch = f"drain.scratch.{uuid.uuid4().hex}"
    client.app.send_task(names.CALL_TASK, args=["s", "ping", {}, {}], queue=scratch, task_id=str(uuid.uuid4()))
    raw = client.redis.rpop(scratch)
    assert raw is not None
    envelope = json.loads(raw)
    envelope["properties"]["delivery_info"].update(exchange="", routing_key=queue)
    edit(envelope)
    return json.dumps(envelope).encode(), envelope["properties"]["delivery_tag"]


def _rpop_calls(client: Client) -> int:
    return int(client.redis.info("commandstats").get("cmdstat_rpop", {}).get("calls", 0))


def test_a_burst_is_drained_recorded_and_run_in_order_and_poison_in_it_leaves_no_unacked_entry(
        client: Client, stack: Stack, worker: WorkerProcess) -> None:
    session = client.session(POOL)
    assert session.worker == worker.node
    queue = names.worker_queue(worker.node)
    bad_body, bad_body_tag = _malformed(client, queue, lambda e: e.update(body="%%% not base64 %%%"))
    no_id, no_id_tag = _malformed(client, queue, lambda e: e["headers"].pop("id"))
    dead_before = int(client.redis.hget(names.STATS_KEY, COUNTER) or 0)
    rpops_before = _rpop_calls(client)

    os.kill(worker.pid, signal.SIGSTOP)
    try:
        first = session.submit("ping")
        client.redis.lpush(queue, bad_body)
        rest = [session.submit("ping") for _ in range(5)]
        client.redis.lpush(queue, no_id)
        rest += [session.submit("ping") for _ in range(5)]
        wait_until(lambda: client.redis.llen(queue) >= 11, timeout_s=10)  # BRPOP may hold the first already
    finally:
        os.kill(worker.pid, signal.SIGCONT)

    replies = [f.result(30) for f in [first, *rest]]
    seqs = [r["seq"] for r in replies]
    assert seqs == sorted(seqs) and len(set(seqs)) == 11  # each ran once, in the session's order
    assert {r["node"] for r in replies} == {worker.node}
    wait_until(lambda: int(client.redis.hget(names.STATS_KEY, COUNTER) or 0) >= dead_before + 2, timeout_s=10)
    assert _rpop_calls(client) > rpops_before  # the drain script popped the rest of the burst
    assert not client.redis.hexists(UNACKED_KEY, bad_body_tag) and not client.redis.hexists(UNACKED_KEY, no_id_tag)
    assert client.redis.zscore(UNACKED_INDEX_KEY, bad_body_tag) is None
    assert client.redis.zscore(UNACKED_INDEX_KEY, no_id_tag) is None
    wait_until(lambda: not [raw for raw in client.redis.hvals(UNACKED_KEY) if queue in raw], timeout_s=10)
    assert session.call("ping")["seq"] == seqs[-1] + 1  # the worker and the session still serve
    session.close()


def test_drained_messages_are_recorded_unacked_before_they_run(client: Client, stack: Stack,
                                                               worker: WorkerProcess) -> None:
    """Calls waiting for their session's turn were all popped by the drain and are un-acked, not queued."""
    session = client.session(POOL)
    queue = names.worker_queue(worker.node)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        futures = [session.submit("ping", sleep_s=0.3) for _ in range(6)]
        wait_until(lambda: client.redis.llen(queue) >= 5, timeout_s=10)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    ids = [f.id for f in futures]

    def unacked_ids() -> set[str]:
        found = set()
        for raw in client.redis.hvals(UNACKED_KEY):
            message = json.loads(raw)[0]
            found.add(message["headers"]["id"])
        return found

    # While the first call sleeps, the other five wait in the worker for their turn: recorded, none queued.
    wait_until(lambda: set(ids) <= unacked_ids() and client.redis.llen(queue) == 0, timeout_s=5)
    assert [f.result(30)["seq"] for f in futures] == sorted(f.result(30)["seq"] for f in futures)
    session.close()


def test_the_drain_script_records_what_it_pops_and_a_retry_gets_the_same_messages(stack: Stack) -> None:
    """A retried call (its reply lost on the way) must not pop more: those would be recorded but never delivered."""
    from routing.broker.scripts import source

    run = uuid.uuid4().hex
    queue, unacked, index, reply = (f"drain.test.{run}.{part}" for part in ("queue", "unacked", "index", "reply"))
    messages = [json.dumps({"body": str(i), "headers": {}, "properties": {
        "delivery_tag": f"tag-{i}", "delivery_info": {"exchange": "", "routing_key": queue}}}) for i in range(5)]
    messages.append("not json")
    stack.redis.lpush(queue, *messages)  # BRPOP/RPOP take from the right: tag-0 first
    script = stack.redis.register_script(source("drain_direct_queue"))
    first = script(keys=[queue, unacked, index, reply], args=[4, 1000.5, 60_000])
    again = script(keys=[queue, unacked, index, reply], args=[4, 1000.5, 60_000])
    assert first == again  # the same four messages, none popped twice or lost
    assert first[0] == "" and first[1::2] == messages[:4] and first[2::2] == ["tag-0", "tag-1", "tag-2", "tag-3"]
    assert stack.redis.llen(queue) == 2
    entry = json.loads(stack.redis.hget(unacked, "tag-2") or "")
    assert entry == [json.loads(messages[2]), "", queue]  # the shape kombu's QoS.append writes
    assert stack.redis.zscore(index, "tag-2") == 1000.5
    rest = script(keys=[queue, unacked, index, f"{reply}.2"], args=[4, 1000.5, 60_000])
    assert rest[1::2] == [messages[4], "not json"] and rest[2::2] == ["tag-4", ""]  # unreadable: not recorded
    assert stack.redis.hlen(unacked) == 5 and 0 < stack.redis.pttl(reply) <= 60_000
    stack.redis.delete(queue, unacked, index, reply, f"{reply}.2")


def raw_text_entry(raw: str, queue: str) -> str:
    return "[" + raw + "," + json.dumps("") + "," + json.dumps(queue) + "]"


def test_a_message_taken_by_brpop_is_recorded_unacked_from_its_popped_bytes(stack: Stack) -> None:
    """The un-acked entry kombu's restore reads back: ``[message, exchange, routing key]``, the message as popped."""
    from kombu import Connection, Consumer, Queue

    from routing.broker.transport import SHARED_CLIENT_TRANSPORT

    queue = f"drain.popped.{uuid.uuid4().hex}"
    seen: list[tuple[str, Any]] = []
    with Connection(stack.redis_url, transport=SHARED_CLIENT_TRANSPORT) as conn:
        conn.default_channel.basic_qos(0, 10, False)
        with conn.Producer() as producer:
            producer.publish({"hello": "popped"}, routing_key=queue, declare=[Queue(queue)], serializer="json")
        raw = stack.redis.lindex(queue, 0)
        assert raw is not None

        def on_message(body: Any, message: Any) -> None:
            seen.append((message.delivery_tag, stack.redis.hget(UNACKED_KEY, message.delivery_tag)))
            message.ack()

        with Consumer(conn, [Queue(queue)], callbacks=[on_message], accept=["json"]):
            conn.drain_events(timeout=5)
        assert conn.default_channel.qos.popped_as == {}  # nothing kept after delivery
    [(tag, entry)] = seen
    assert entry is not None
    assert json.loads(entry) == [json.loads(raw), "", queue]  # what kombu's own write would hold
    assert entry == raw_text_entry(raw, queue)  # byte for byte the popped item (kombu's re-encoding differs)
    assert stack.redis.hget(UNACKED_KEY, tag) is None and stack.redis.zscore(UNACKED_INDEX_KEY, tag) is None


def test_the_script_records_the_message_brpop_took_first_then_the_rest(stack: Stack) -> None:
    """The caller parsed the BRPOP'd message already: it hands the script the tag and the entry to record."""
    from routing.broker.scripts import source

    run = uuid.uuid4().hex
    queue, unacked, index, reply = (f"drain.first.{run}.{part}" for part in ("queue", "unacked", "index", "reply"))

    def message(i: int) -> str:
        return json.dumps({"body": str(i), "headers": {}, "properties": {
            "delivery_tag": f"t-{i}", "delivery_info": {"exchange": "", "routing_key": queue}}})

    stack.redis.lpush(queue, message(1), message(2))
    script = stack.redis.register_script(source("drain_direct_queue"))
    got = script(keys=[queue, unacked, index, reply], args=[5, 7.0, 60_000, "t-0", raw_text_entry(message(0), queue)])
    assert got == ["t-0", message(1), "t-1", message(2), "t-2"]  # the given message's tag, then what it popped
    assert json.loads(stack.redis.hget(unacked, "t-0") or "") == [json.loads(message(0)), "", queue]
    assert stack.redis.lrange(reply, 0, -1) == got  # kept for a retry
    lone = script(keys=[queue, unacked, index, f"{reply}.2"],
                  args=[0, 7.0, 60_000, "t-3", raw_text_entry(message(3), queue)])
    assert lone == ["t-3"] and stack.redis.hlen(unacked) == 4  # no room: only the one it was given
    assert not stack.redis.exists(f"{reply}.2")  # nothing popped: nothing a retry could lose, nothing kept
    stack.redis.delete(queue, unacked, index, reply, f"{reply}.2")
