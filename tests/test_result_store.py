"""The workers' result backend stores a result in one atomic script with Celery's semantics, on the real server."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, states

from routing import Client, names
from routing.broker.celery_config import celery_config
from routing.broker.connect import redis_client
from routing.broker.result_store import StoreBackend
from routing.broker.scripts import source
from routing.settings import Settings
from tasks.local.stack import Stack


@pytest.fixture(scope="module")
def app(stack: Stack) -> Iterator[Celery]:
    app = Celery("result-store-test")
    app.conf.update(celery_config(Settings.from_env(), stack.redis_url))
    yield app
    app.close()


def _stored(stack: Stack, app: Celery, task_id: str) -> dict[str, object]:
    raw = stack.redis.get(app.backend.get_key_for_task(task_id).decode())
    assert raw is not None
    return json.loads(raw)


def test_workers_use_the_atomic_store_and_a_result_looks_as_celery_stores_it(app: Celery, stack: Stack) -> None:
    assert isinstance(app.backend, StoreBackend)
    task_id = str(uuid.uuid4())
    key = app.backend.get_key_for_task(task_id).decode()
    listener = redis_client(stack.redis_url, decode_responses=True).pubsub()
    listener.subscribe(key)
    assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    app.backend.store_result(task_id, {"answer": 42}, states.SUCCESS)
    meta = _stored(stack, app, task_id)
    assert meta["status"] == "SUCCESS" and meta["result"] == {"answer": 42} and meta["task_id"] == task_id
    assert 3_500_000 < stack.redis.pttl(key) <= int(app.conf.result_expires * 1000)  # result_expires, as Celery
    published = listener.get_message(timeout=5)
    assert published is not None and json.loads(published["data"]) == meta  # the listener's channel, same value
    assert app.AsyncResult(task_id).get(timeout=5) == {"answer": 42}  # Celery reads it back unchanged
    listener.close()


def test_a_stored_final_result_is_never_overwritten_a_failure_included(app: Celery, stack: Stack) -> None:
    done, failed = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.store_result(done, "first", states.SUCCESS)
    app.backend.store_result(done, ValueError("a lost duplicate"), states.FAILURE)
    app.backend.store_result(done, "second", states.SUCCESS)
    assert _stored(stack, app, done)["result"] == "first"

    app.backend.store_result(failed, ValueError("boom"), states.FAILURE)
    assert _stored(stack, app, failed)["status"] == "FAILURE"
    app.backend.store_result(failed, "a late run resumed", states.SUCCESS)  # e.g. its worker was declared dead
    assert _stored(stack, app, failed)["status"] == "FAILURE"
    pending = str(uuid.uuid4())
    app.backend.store_result(pending, None, states.STARTED)  # a state that is not final is overwritten
    app.backend.store_result(pending, "done", states.SUCCESS)
    assert _stored(stack, app, pending)["result"] == "done"


def test_a_real_worker_stores_its_calls_results_through_the_script(client: Client, stack: Stack) -> None:
    sha = hashlib.sha1(source("store_unless_succeeded").encode()).hexdigest()
    stack.redis.script_flush()  # every client re-loads its scripts on NOSCRIPT
    assert stack.redis.script_exists(sha) == [False]
    result = client.app.send_task(names.NOOP_TASK, queue=names.pool_queue("triage_pool"))
    assert result.get(timeout=30)["pid"] > 0
    assert stack.redis.script_exists(sha) == [True]


def test_compressed_results_take_celerys_own_path_with_the_same_rule(stack: Stack) -> None:
    app = Celery("result-store-compressed")
    app.conf.update(celery_config(Settings.from_env(), stack.redis_url), result_compression="zlib")
    try:
        task_id = str(uuid.uuid4())
        app.backend.store_result(task_id, "kept", states.SUCCESS)
        app.backend.store_result(task_id, ValueError("late duplicate"), states.FAILURE)
        raw = redis_client(stack.redis_url).get(app.backend.get_key_for_task(task_id))
        assert raw is not None and not raw.startswith(b"{")  # compressed: the script could not have read it
        assert app.AsyncResult(task_id).get(timeout=5) == "kept"
    finally:
        app.close()


def _own_keys() -> dict[str, str]:
    """Un-acked keys of this test's own (the workers' ``unacked`` is restored by their visibility sweeps)."""
    run = uuid.uuid4().hex
    return {"hash": f"test.unacked.{run}", "index": f"test.unacked_index.{run}"}


def _unacked(stack: Stack, keys: dict[str, str], tag: str) -> tuple[bool, bool]:
    return bool(stack.redis.hexists(keys["hash"], tag)), stack.redis.zscore(keys["index"], tag) is not None


def _delivered(stack: Stack, keys: dict[str, str], tag: str) -> None:
    stack.redis.hset(keys["hash"], tag, '[{"fake": 1}, "", "q"]')
    stack.redis.zadd(keys["index"], {tag: time.time()})


def test_a_success_acknowledges_its_delivery_in_the_same_script_when_the_worker_says_so(
        app: Celery, stack: Stack) -> None:
    from celery.app.task import Context

    from routing.broker import result_acks
    from routing.broker.result_store import ACK_WITH_RESULT

    keys = _own_keys()

    def request(task_id: str, tag: str) -> Context:
        _delivered(stack, keys, tag)
        return Context(id=task_id, properties={"delivery_tag": tag})

    tags = [str(uuid.uuid4()) for _ in range(5)]
    ids = [str(uuid.uuid4()) for _ in range(5)]
    app.conf[ACK_WITH_RESULT] = None  # as on a producer, or a worker whose broker is another server
    app.backend.store_result(ids[0], "kept", states.SUCCESS, request=request(ids[0], tags[0]))
    assert _unacked(stack, keys, tags[0]) == (True, True) and not result_acks.take(tags[0])
    app.conf[ACK_WITH_RESULT] = keys
    try:
        app.backend.store_result(ids[1], "kept", states.SUCCESS, request=request(ids[1], tags[1]))
        assert _unacked(stack, keys, tags[1]) == (False, False)  # gone with the stored result, in one script
        assert _stored(stack, app, ids[1])["result"] == "kept"
        assert result_acks.take(tags[1]) and not result_acks.take(tags[1])
        app.backend.store_result(ids[2], ValueError("x"), states.FAILURE, request=request(ids[2], tags[2]))
        assert _unacked(stack, keys, tags[2]) == (True, True)  # a failure is acknowledged by Celery, as before
        app.backend.store_result(ids[4], "other", states.SUCCESS, request=request(ids[3], tags[3]))
        assert _unacked(stack, keys, tags[3]) == (True, True)  # another task's result: not this delivery's ack
        app.backend.store_result(ids[4], "again", states.SUCCESS, request=Context(id=ids[4], properties={
            "delivery_tag": tags[4]}))  # no record to remove (another server, a restore): Celery's ack stays real
        assert not result_acks.take(tags[4])
    finally:
        app.conf[ACK_WITH_RESULT] = None
        stack.redis.delete(keys["hash"], keys["index"])


def test_the_consumer_acks_a_delivery_acknowledged_with_its_result_in_memory_only(stack: Stack) -> None:
    from kombu import Connection

    from routing.broker import result_acks
    from routing.broker.transport import SHARED_CLIENT_TRANSPORT

    keys = _own_keys()
    options = {"unacked_key": keys["hash"], "unacked_index_key": keys["index"]}
    with Connection(stack.redis_url, transport=SHARED_CLIENT_TRANSPORT, transport_options=options) as conn:
        qos = conn.default_channel.qos
        assert qos.unacked_key == keys["hash"]
        remembered, plain = str(uuid.uuid4()), str(uuid.uuid4())
        for tag in (remembered, plain):
            _delivered(stack, keys, tag)
            qos._delivered[tag] = object()
        result_acks.remember(remembered)
        try:
            qos.ack(remembered)
            qos.ack(plain)
            qos._flush()  # kombu drops acked tags from its in-memory record lazily
            assert remembered not in qos._delivered and plain not in qos._delivered
            assert _unacked(stack, keys, remembered) == (True, True)  # no command: the script removed it already
            assert _unacked(stack, keys, plain) == (False, False)  # kombu's own ack, as before
        finally:
            stack.redis.delete(keys["hash"], keys["index"])


def test_flagship_workers_acknowledge_with_the_result(client: Client) -> None:
    from routing.broker.result_store import ACK_WITH_RESULT, DEFAULT_ACK_KEYS

    replies = client.app.control.inspect(timeout=5).conf(with_defaults=False) or {}
    assert replies, "no worker answered"
    flagship = {node: conf for node, conf in replies.items() if "triage" in node or "analytics" in node}
    assert flagship and all(conf.get(ACK_WITH_RESULT) == DEFAULT_ACK_KEYS for conf in flagship.values())
