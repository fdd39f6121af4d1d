"""Results come back on the producer's one reply channel: no subscription per call, nothing lost in a gap."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import states

from routing import Client, Session, names
from routing.broker.connect import redis_client
from routing.broker.deadletter import DeadLetterSettings, Letter, dead_letter, failure_result
from routing.producer.results import listener as results_module
from routing.producer.results.listener import RESULT_KEY_PREFIX
from tasks.local.stack import Stack

POOL = "triage_pool"


@pytest.fixture
def observer(stack: Stack) -> Iterator[Callable[[str], Any]]:
    """Subscribe a separate connection to a channel; returns the pub/sub object once Redis confirmed it."""
    opened: list[Any] = []

    def watch(channel: str) -> Any:
        pubsub = redis_client(stack.redis_url, decode_responses=True).pubsub()
        pubsub.subscribe(channel)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        opened.append(pubsub)
        return pubsub

    yield watch
    for pubsub in opened:
        pubsub.close()


def _messages(pubsub: Any, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            got.append(json.loads(message["data"]))
    return got


def _confirm_reply_channel(client: Client) -> None:
    """Start the listener and wait until its reply channel is confirmed (a first call does)."""
    warm_up = str(uuid.uuid4())
    client.results.expect(warm_up, replied=True)
    client.results.discard(warm_up)


def test_session_calls_are_answered_on_the_reply_channel_with_no_channel_per_call(
        client: Client, sessions: Callable[..., Session], stack: Stack, observer: Callable[[str], Any]) -> None:
    session = sessions(POOL)
    session.call("ping")  # bound, and the reply channel confirmed
    watch = observer(client.results.reply_channel)
    futures = [session.submit("ping") for _ in range(5)]
    answers = [f.result(timeout=30) for f in futures]
    assert all(a["pid"] == answers[0]["pid"] for a in answers)  # strict: one worker process ran them all
    published = _messages(watch, 5)
    assert sorted(m["task_id"] for m in published) == sorted(f.id for f in futures)
    assert all(m["status"] == states.SUCCESS for m in published)
    # The listener never subscribed to the calls' own channels (it used to keep one per call until rotation).
    subscribed = stack.redis.pubsub_numsub(*(RESULT_KEY_PREFIX + f.id for f in futures))
    assert [count for _, count in subscribed] == [0] * 5
    [(_, listeners)] = stack.redis.pubsub_numsub(client.results.reply_channel)
    assert listeners == 2  # the client's listener and this test's observer


def test_a_result_published_only_on_its_key_channel_is_found_by_the_safety_sweep(
        client: Client, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_module, "sweep_every_s", 0.2)
    monkeypatch.setattr(results_module, "stale_after_s", 0.2)
    _confirm_reply_channel(client)
    task_id = str(uuid.uuid4())
    future = client.results.expect(task_id, replied=True)
    # As a worker of an older version stores it: the key channel only.
    stored = json.dumps({"status": "SUCCESS", "result": {"answer": 7}, "traceback": None, "children": [],
                         "task_id": task_id, "date_done": None})
    stack.redis.set(RESULT_KEY_PREFIX + task_id, stored, ex=60)
    stack.redis.publish(RESULT_KEY_PREFIX + task_id, stored)
    assert future.result(timeout=5) == {"answer": 7}


def test_results_published_while_the_reply_channel_was_down_are_read_after_it_is_back(
        client: Client, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_module, "sweep_every_s", 3600.0)  # only the gap read (or the message) can settle it
    _confirm_reply_channel(client)
    task_ids = [str(uuid.uuid4()) for _ in range(20)]
    futures = [client.results.expect(task_id, replied=True) for task_id in task_ids]
    host, port = client.results._pubsub.connection._sock.getsockname()[:2]
    assert stack.redis.client_kill_filter(addr=f"{host}:{port}") == 1  # the listener's connection only
    for task_id in task_ids:  # while the listener reconnects, mostly: published to nobody
        meta = json.dumps({"status": "SUCCESS", "result": task_id, "traceback": None, "children": [],
                           "task_id": task_id, "date_done": None})
        pipe = stack.redis.pipeline()
        pipe.set(RESULT_KEY_PREFIX + task_id, meta, ex=60)
        pipe.publish(client.results.reply_channel, meta)
        pipe.execute()
    assert [f.result(timeout=10) for f in futures] == task_ids


def test_a_dead_lettered_call_fails_on_its_reply_channel(stack: Stack, observer: Callable[[str], Any]) -> None:
    reply = names.reply_channel(uuid.uuid4().hex)
    watch = observer(reply)
    task_id = str(uuid.uuid4())
    dead_letter(stack.redis, Letter("scratch", "test: unreadable", b"{}", task_id, "flagship.call", reply),
                DeadLetterSettings())
    [message] = _messages(watch, 1)
    assert message["task_id"] == task_id and message["status"] == "FAILURE"
    assert json.loads(failure_result(task_id, "x"))["result"]["exc_type"] == message["result"]["exc_type"]


def test_workers_publish_only_on_reply_channels(client: Client, stack: Stack, observer: Callable[[str], Any]) -> None:
    reply = names.reply_channel(uuid.uuid4().hex)
    elsewhere = names.PREFIX + ":stats"  # any other channel a message may name
    on_reply, on_other = observer(reply), observer(elsewhere)
    queue = names.pool_queue(POOL)
    good = client.app.send_task(names.NOOP_TASK, queue=queue, reply_to=reply)
    bad = client.app.send_task(names.NOOP_TASK, queue=queue, reply_to=elsewhere)
    assert good.get(timeout=30)["pid"] > 0 and bad.get(timeout=30)["pid"] > 0
    [message] = _messages(on_reply, 1)
    assert message["task_id"] == good.id
    assert _messages(on_other, 1, timeout_s=1.0) == []


def test_reply_channel_names_are_checked() -> None:
    token = uuid.uuid4().hex
    assert names.reply_channel_or_none(names.reply_channel(token)) == f"flagship:results:{token}"
    for bad in ("flagship:stats", f"flagship:results:{token}x", f"flagship:results:{token.upper()}", None, 7,
                f"celery-task-meta-{token}"):
        assert names.reply_channel_or_none(bad) is None
    with pytest.raises(ValueError):
        names.reply_channel("not-hex")


def test_celerys_own_store_path_tells_the_reply_channel_which_call_to_read(
        stack: Stack, observer: Callable[[str], Any]) -> None:
    from celery import Celery
    from celery.app.task import Context

    from routing.broker.celery_config import celery_config
    from routing.settings import Settings

    app = Celery("reply-compressed")
    app.conf.update(celery_config(Settings.from_env(), stack.redis_url), result_compression="zlib")
    reply = names.reply_channel(uuid.uuid4().hex)
    watch = observer(reply)
    try:
        task_id = str(uuid.uuid4())
        app.backend.store_result(task_id, "kept", states.SUCCESS, request=Context(reply_to=reply))
        assert _messages(watch, 1) == [{"task_id": task_id}]
        assert stack.redis.exists(RESULT_KEY_PREFIX + task_id)
    finally:
        app.close()


def test_a_pointer_on_the_reply_channel_has_the_listener_read_the_key(
        client: Client, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_module, "sweep_every_s", 3600.0)
    _confirm_reply_channel(client)
    task_id = str(uuid.uuid4())
    future = client.results.expect(task_id, replied=True)
    stack.redis.set(RESULT_KEY_PREFIX + task_id, json.dumps(
        {"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad"], "exc_module": "builtins"},
         "traceback": None, "children": [], "task_id": task_id, "date_done": None}), ex=60)
    stack.redis.publish(client.results.reply_channel, json.dumps({"task_id": task_id}))
    with pytest.raises(ValueError, match="bad"):
        future.result(timeout=5)


def test_an_unreadable_stored_result_fails_its_own_call_and_the_listener_goes_on(
        client: Client, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_module, "sweep_every_s", 3600.0)
    _confirm_reply_channel(client)
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    bad_future, good_future = client.results.expect(bad, replied=True), client.results.expect(good, replied=True)
    stack.redis.set(RESULT_KEY_PREFIX + bad, "{not json", ex=60)
    stack.redis.publish(client.results.reply_channel, json.dumps({"task_id": bad}))
    assert bad_future.exception(timeout=5) is not None
    meta = json.dumps({"status": "SUCCESS", "result": "fine", "traceback": None, "children": [], "task_id": good,
                       "date_done": None})
    stack.redis.publish(client.results.reply_channel, meta)
    assert good_future.result(timeout=5) == "fine"
