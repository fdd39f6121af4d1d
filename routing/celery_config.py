"""Celery settings shared by workers and producers: JSON only, nothing lost."""

from __future__ import annotations

import binascii
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

from kombu.exceptions import ChannelError
from kombu.transport import redis as kombu_redis
from kombu.utils.objects import cached_property

from routing.deadletter import DELIVERIES_HEADER, DeadLetterSettings, Letter, dead_letter, deliveries
from routing.envelope import NotAnEnvelope, envelope_problem, parse_item
from routing.settings import Settings
from routing.tls import tls_url

log = logging.getLogger(__name__)


class SharedClientChannel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one ``redis.Redis`` client per connection pool.

    kombu builds a new client (~0.1 ms of CPU: redis-py fills its callback
    tables) for every publish, every received message (the un-acked index) and
    every ack. A client is thread-safe (each command borrows a connection from the
    pool and returns it), so one per pool serves them all; a new pool (after a
    reconnect) gets a new client.
    """

    _shared: tuple[Any, Any] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool, shared = self.pool, self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())  # type: ignore[no-untyped-call]
        yield shared[1]

    # -- poison guard: every popped item is checked before kombu builds a message from it --------

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's ``_brpop_read``, delivering through :meth:`_deliver_popped` instead of a bare ``loads``."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next turn of the loop reconnects
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = (dest.decode() if isinstance(dest, bytes) else dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_popped(item, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """kombu's ``_get`` (``basic_get``), skipping (and dead-lettering) items that are not envelopes."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while item := client.rpop(self._q_for_pri(queue, pri)):  # type: ignore[no-untyped-call]
                    self._maybe_update_queues_expire(client, queue)  # type: ignore[no-untyped-call]
                    if (envelope := self._checked(item, queue)) is not None:
                        return envelope
            self._maybe_update_queues_expire(client, queue)  # type: ignore[no-untyped-call]
            raise Empty()

    def _deliver_popped(self, item: bytes, queue: str) -> None:
        envelope = self._checked(item, queue)
        if envelope is None:
            return
        try:
            self.connection._deliver(envelope, queue)
        except self._broker_errors:
            raise
        except Exception as exc:  # kombu choked on it (a body that is not base64, ...): not fatal
            tag, headers = envelope["properties"]["delivery_tag"], envelope["headers"]
            what = f"{type(exc).__name__}: {str(exc)[:200]}"
            reason = f"body is not valid base64 ({what})" if isinstance(exc, binascii.Error) else \
                f"delivery failed ({what})"
            self._dead_letter(Letter(queue, reason, item, _text(headers.get("id")), _text(headers.get("task"))))
            if tag in self.qos._delivered:  # recorded as un-acked before it failed
                self.qos.ack(tag)

    def _checked(self, item: bytes, queue: str) -> dict[str, Any] | None:
        """The envelope in ``item``, or None once it has been dead-lettered."""
        try:
            return parse_item(item)
        except NotAnEnvelope as wrong:
            self._dead_letter(Letter(queue, wrong.problem, item, wrong.task_id, wrong.task))
            return None

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        """A broadcast (Celery's remote control) that is not an envelope is dropped with one line, not fatal."""
        problem = envelope_problem(message)
        if problem is not None:
            log.warning("dropped a broadcast on %s: %s", exchange, problem)
            return False
        return bool(super()._deliver_fanout_message(message, exchange))  # type: ignore[no-untyped-call]

    def _dead_letter(self, letter: Letter) -> None:
        try:
            with self.conn_or_acquire() as client:
                dead_letter(client, letter, DeadLetterSettings.from_env())
        except Exception:  # it was popped already: say what is lost rather than take the worker down
            log.error("could not dead-letter a message from %s (%s): %.300r", letter.queue, letter.reason,
                      letter.raw, exc_info=True)

    @cached_property
    def _broker_errors(self) -> tuple[type[BaseException], ...]:
        return (*self.connection.connection_errors, *self.connection.channel_errors, ChannelError)

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        """kombu's restore of an un-acked message, counting the delivery that did not complete."""
        headers = payload.get("headers") if isinstance(payload, dict) else None
        if isinstance(headers, dict):
            headers[DELIVERIES_HEADER] = deliveries(headers) + 1
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[no-untyped-call]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`SharedClientChannel` (``broker_transport`` for ``redis://``)."""

    Channel = SharedClientChannel


class TLSRedisTransport(RedisTransport):
    """The same for ``rediss://``: TLS even when the URL carries no ``ssl_*`` option.

    kombu turns TLS on from the ``rediss`` scheme only when it picked the transport
    itself; a transport named in ``broker_transport`` must be told (kombu's own
    default there is not to verify the certificate; this one verifies it).
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        if not client.ssl:
            client.ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]


#: ``broker_transport`` for ``redis://`` brokers (Sentinel keeps kombu's own).
SHARED_CLIENT_TRANSPORT = f"{__name__}:{RedisTransport.__name__}"
#: ``broker_transport`` for ``rediss://`` brokers.
TLS_TRANSPORT = f"{__name__}:{TLSRedisTransport.__name__}"


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    redis_url = tls_url(redis_url)  # rediss://: verify the server's certificate, FLAGSHIP_REDIS_CA_FILE
    transport = {
        # An un-acked message (its worker died) returns to its queue after this long.
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    config: dict[str, Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        # JSON only: nothing a producer sends is ever unpickled.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # A call is acknowledged only after it ran; a killed worker's calls are redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # One reserved message per thread: a busy worker leaves calls in the queue.
        "worker_prefetch_multiplier": 1,
        "result_expires": 3600,
        "result_extended": False,
        "task_track_started": False,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": "flagship.default",
    }
    scheme = urlsplit(redis_url).scheme  # sentinel:// keeps kombu's own transport
    if scheme in ("redis", "rediss"):
        config["broker_transport"] = TLS_TRANSPORT if scheme == "rediss" else SHARED_CLIENT_TRANSPORT
    return config
