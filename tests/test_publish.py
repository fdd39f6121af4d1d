"""Session calls are pushed as the very message ``send_task`` would publish; anything it cannot reproduce uses it."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import signals

from routing import Client, Session, names
from routing.errors import InvalidArgument
from routing.producer.publish import Publisher
from tasks.local.stack import Stack

ARGS = ["session-1", "call", {"ref": "predict-1", "inputs": {"ticket": "Checkout returns 502", "n": 3}},
        {"affinity": "strict", "node": "w", "sent_at": 1.5}]


@pytest.fixture
def scratch(stack: Stack) -> Iterator[str]:
    queue = f"publish.scratch.{uuid.uuid4().hex}"
    yield queue
    stack.redis.delete(queue)


def _popped(stack: Stack, queue: str) -> dict[str, Any]:
    raw = stack.redis.rpop(queue)
    assert raw is not None
    return json.loads(raw)


def test_the_pushed_message_is_the_one_send_task_publishes(client: Client, stack: Stack, scratch: str) -> None:
    publisher = Publisher(client.app, client.redis)
    assert publisher.direct()
    reply = client.results.reply_channel
    task_id = str(uuid.uuid4())
    client.app.send_task(names.CALL_TASK, args=ARGS, queue=scratch, task_id=task_id, declare=[], reply_to=reply,
                         shadow="flagship.predict.call", argsrepr="shown")
    publisher.send(names.CALL_TASK, ARGS, scratch, task_id, reply_to=reply, shadow="flagship.predict.call",
                   argsrepr="shown")
    via_celery, pushed = _popped(stack, scratch), _popped(stack, scratch)
    for envelope in (via_celery, pushed):
        envelope["properties"].pop("delivery_tag")
    via_celery["properties"].pop("argsrepr")  # send_task also copies its leftover options into the properties
    assert pushed == via_celery
    assert json.loads(base64.b64decode(pushed["body"]))[0] == ARGS


def test_a_publish_signal_receiver_sends_through_celery(client: Client, stack: Stack, scratch: str) -> None:
    seen: list[str] = []

    def receiver(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append((headers or {}).get("id", "?"))
        if headers is not None:
            headers["traceparent"] = "00-abc-def-01"  # what tracing instrumentation adds

    signals.before_task_publish.connect(receiver, weak=False)
    try:
        publisher = Publisher(client.app, client.redis)
        assert not publisher.direct()
        task_id = str(uuid.uuid4())
        publisher.send(names.CALL_TASK, ARGS, scratch, task_id, reply_to=client.results.reply_channel,
                       shadow="flagship.predict.call", argsrepr="shown")
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert seen == [task_id]
    assert _popped(stack, scratch)["headers"]["traceparent"] == "00-abc-def-01"
    assert Publisher(client.app, client.redis).direct()


def test_session_calls_run_through_the_pushed_messages(sessions: Callable[..., Session]) -> None:
    session = sessions("triage_pool")
    first, second = session.call("ping"), session.call("ping")
    assert (second["pid"], second["seq"]) == (first["pid"], first["seq"] + 1)
    with pytest.raises(InvalidArgument):
        session.call("ping", payload=object())
    assert session.call("ping")["seq"] == first["seq"] + 2  # a refused argument left nothing behind
