"""Session calls published straight onto their queue: Celery's own task message, one ``LPUSH``.

``app.send_task`` spent ~0.62 ms of CPU per call on this machine before and around
its ``LPUSH`` (options and routing, a producer from the pool, kombu's publish with
its retry wrapper and channel, an ``AsyncResult`` the router drops); building the
same message and pushing it costs ~0.20 ms. In the LM benchmark that was over
half of the producer's GIL time, and the first of 64 sessions' calls left up to
~80 ms after the first.

The message is Celery's: headers, properties and body come from
``app.amqp.create_task_message``, the envelope is what kombu's Redis transport
writes for the default exchange (the body in base64, ``delivery_info``, a delivery
tag), with kombu's JSON encoder. Whatever this shortcut does not reproduce takes
``send_task`` as before (the app's settings are read once, when the client builds its
publisher; signal receivers and the calling task on every call): publish signals with
receivers (tracing instrumentation),
a call made from inside a Celery task (root and parent ids), sent events,
compression, another serializer or protocol, a key prefix, a default priority, task
routes or declared queues (an exchange of their own).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from celery import Celery, signals
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps
from redis import Redis

__all__ = ["Publisher"]


class Publisher:
    """Publishes task messages for ``app`` on ``redis`` (the same server as the app's broker)."""

    def __init__(self, app: Celery, redis: Redis) -> None:
        """``app`` configured already: its settings are read here once (a Celery setting costs 2-5 µs a read,
        and eleven of them were a third of a pushed message's cost)."""
        self.app = app
        self.redis = redis
        conf = app.conf
        #: The app's settings allow the shortcut (Celery's JSON protocol 2 on the default exchange, nothing more).
        self.settings_allow = not (
            conf.task_serializer != "json" or conf.task_compression or conf.task_protocol != 2
            or conf.task_send_sent_event or conf.task_default_priority or conf.task_routes or conf.task_queues
            or conf.task_default_exchange_type != "direct"
            or (conf.broker_transport_options or {}).get("global_keyprefix"))
        self.delivery_mode = maybe_delivery_mode(conf.task_default_delivery_mode)  # type: ignore[no-untyped-call]

    def direct(self) -> bool:
        """Whether a message can skip ``send_task`` now (receivers can connect at any time: checked per call)."""
        return self.settings_allow and not (
            signals.before_task_publish.receivers or signals.after_task_publish.receivers
            or signals.task_sent.receivers or self.app.current_worker_task is not None)

    def send(self, name: str, args: list[Any], queue: str, task_id: str, *, reply_to: str, shadow: str,
             argsrepr: str, headers: dict[str, Any] | None = None) -> None:
        """Publish ``name(*args)`` on ``queue`` as Celery would with ``send_task`` (``declare=[]``)."""
        if not self.direct():
            self.app.send_task(name, args=args, queue=queue, task_id=task_id, declare=[], reply_to=reply_to,
                               shadow=shadow, argsrepr=argsrepr, headers=headers)
            return
        task_headers, properties, body, _ = self.app.amqp.create_task_message(
            task_id, name, args, None, reply_to=reply_to, shadow=shadow, argsrepr=argsrepr, ignore_result=None)
        if headers:
            task_headers.update(headers)
        try:
            payload = dumps(body)  # type: ignore[no-untyped-call]
        except Exception as exc:  # any encoder failure, as kombu's serializer reports it
            raise EncodeError(exc) from exc
        envelope = {
            "body": base64.b64encode(payload.encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": task_headers,
            "properties": {
                **properties,
                "delivery_mode": self.delivery_mode,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        self.redis.lpush(queue, dumps(envelope))  # type: ignore[no-untyped-call]
