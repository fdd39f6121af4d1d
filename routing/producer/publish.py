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

The push is never retried by redis-py: a push whose reply was lost may have been
applied, and pushing it again would queue the call twice. :class:`Outgoing`
says whether the bytes may have left (``written``) and what to look for; the
router keeps such a call pending and looks for it
(``routing.producer.recovery.unconfirmed``).
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from celery import Celery, signals
from kombu.entity import maybe_delivery_mode
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps
from redis import Redis

__all__ = ["Outgoing", "Publisher", "push_once"]


@dataclass
class Outgoing:
    """One call message, ready to push (and what to look for if the push's outcome is unknown)."""

    name: str
    args: list[Any]
    queue: str
    task_id: str
    #: ``send_task``'s other arguments (reply_to, shadow, argsrepr, headers): what a resend needs.
    options: dict[str, Any] = field(default_factory=dict)
    #: The exact list element pushed and its kombu delivery tag (None: sent through ``send_task``).
    payload: str | None = None
    delivery_tag: str | None = None
    #: Set just before bytes leave: an error after that leaves the push maybe applied.
    written: bool = False


def push_once(redis: Redis, message: Outgoing) -> None:
    """``LPUSH`` the message without redis-py's retry (which would push it again after a lost reply)."""
    assert message.payload is not None
    pool = redis.connection_pool
    connection = pool.get_connection()
    try:
        connection.check_health()  # a stale pooled connection is replaced before anything is written
        message.written = True
        connection.send_command("LPUSH", message.queue, message.payload, check_health=False)
        redis.parse_response(connection, "LPUSH")
    except redis_lib.ResponseError:
        raise
    except BaseException:
        connection.disconnect()  # its reply may still come: never reuse it
        raise
    finally:
        pool.release(connection)


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
             argsrepr: str, headers: dict[str, Any] | None = None) -> Outgoing:
        """Publish ``name(*args)`` on ``queue`` as Celery would with ``send_task`` (``declare=[]``)."""
        message = self.prepare(name, args, queue, task_id, reply_to=reply_to, shadow=shadow, argsrepr=argsrepr,
                               headers=headers)
        self.push(message)
        return message

    def prepare(self, name: str, args: list[Any], queue: str, task_id: str, *, reply_to: str, shadow: str,
                argsrepr: str, headers: dict[str, Any] | None = None) -> Outgoing:
        """The message :meth:`send` pushes (``EncodeError`` if the arguments are not JSON)."""
        message = Outgoing(name, args, queue, task_id,
                           {"reply_to": reply_to, "shadow": shadow, "argsrepr": argsrepr, "headers": headers})
        if self.direct():
            message.payload, message.delivery_tag = self._envelope(message)
        return message

    def push(self, message: Outgoing) -> None:
        """Push a prepared message (once: see the module docstring); ``message.written`` says if bytes left."""
        if message.payload is None:
            message.written = True  # kombu connects and writes in one go
            self.app.send_task(message.name, args=message.args, queue=message.queue, task_id=message.task_id,
                               declare=[], retry=False, **message.options)
            return
        push_once(self.redis, message)

    def resent(self, message: Outgoing, header: str) -> Outgoing:
        """A copy of ``message`` under the same task id with ``header`` set (a fresh delivery tag)."""
        options = {**message.options, "headers": {**(message.options.get("headers") or {}), header: 1}}
        return self.prepare(message.name, message.args, message.queue, message.task_id, **options)

    def _envelope(self, message: Outgoing) -> tuple[str, str]:
        """kombu's Redis envelope of the message, and its delivery tag."""
        options = message.options
        task_headers, properties, body, _ = self.app.amqp.create_task_message(
            message.task_id, message.name, message.args, None, reply_to=options["reply_to"], shadow=options["shadow"],
            argsrepr=options["argsrepr"], ignore_result=None)
        if options["headers"]:
            task_headers.update(options["headers"])
        try:
            payload = dumps(body)  # type: ignore[no-untyped-call]
        except Exception as exc:  # any encoder failure, as kombu's serializer reports it
            raise EncodeError(exc) from exc
        delivery_tag = str(uuid.uuid4())
        envelope = {
            "body": base64.b64encode(payload.encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": task_headers,
            "properties": {
                **properties,
                "delivery_mode": self.delivery_mode,
                "delivery_info": {"exchange": "", "routing_key": message.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": delivery_tag,
            },
        }
        return dumps(envelope), delivery_tag  # type: ignore[no-untyped-call]
