"""The workers' result backend stores a result in one atomic script with Celery's semantics, on the real server."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, states

from routing import Client, names
from routing.celery_config import celery_config
from routing.connect import redis_client
from routing.result_store import StoreBackend
from routing.scripts import source
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


def test_a_stored_success_is_never_overwritten_but_a_failure_is(app: Celery, stack: Stack) -> None:
    done, failed = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.store_result(done, "first", states.SUCCESS)
    app.backend.store_result(done, ValueError("a lost duplicate"), states.FAILURE)
    app.backend.store_result(done, "second", states.SUCCESS)
    assert _stored(stack, app, done)["result"] == "first"

    app.backend.store_result(failed, ValueError("boom"), states.FAILURE)
    assert _stored(stack, app, failed)["status"] == "FAILURE"
    app.backend.store_result(failed, "retried", states.SUCCESS)
    assert _stored(stack, app, failed)["result"] == "retried"


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
