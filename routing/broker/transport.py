"""kombu Redis transports for the broker: one shared client per pool, a poison guard, Sentinel.

:class:`GuardedChannel` is mixed into kombu's plain and Sentinel channels, so ``redis://``,
``rediss://`` and ``sentinel://`` brokers all get the same behaviour:

* one ``redis.Redis`` client per connection pool (kombu builds one per publish, receipt and ack);
* every popped item is checked before kombu builds a message from it: what is not an envelope
  is dead-lettered, never fatal to the worker;
* a burst in the worker's own queue is popped and recorded un-acked in one script
  (``routing.broker.drain``; shared queues stay one message per ``BRPOP``);
* an un-acknowledged message that comes back **by the visibility timeout** (its worker died or hung)
  counts as a delivery that did not complete (``flagship_deliveries``); other restores do not;
* a **live** worker that loses its broker connection keeps its deliveries recorded un-acked instead
  of kombu's restore of all of them (which ran every held call twice: the worker runs them still),
  and its broadcast subscription raises rather than reconnecting inside a read; a worker that dies
  leaves them to the reaper.
"""

from __future__ import annotations

import binascii
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import TYPE_CHECKING, Any

import redis as redis_lib
from kombu.exceptions import ChannelError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.objects import cached_property

from routing.broker import result_acks
from routing.broker.connect import PubSubFailingOnLoss
from routing.broker.deadletter import DELIVERIES_HEADER, DeadLetterSettings, Letter, dead_letter, deliveries
from routing.broker.drain import PrerecordedQoS, deliver_popped
from routing.broker.envelope import NotAnEnvelope, envelope_problem, parse_item, text_or_none

log = logging.getLogger(__name__)

#: How often a channel opened during a failover asks again for the primary.
failover_poll_s = 0.1

#: Set while this thread restores messages whose visibility timeout passed (see :class:`CountingQoS`).
_restoring_invisible = threading.local()
#: Set by a flagship worker while it runs (cleared when it shuts down): a closed channel keeps its deliveries.
live_worker = threading.Event()


class CountingQoS(PrerecordedQoS):
    """kombu's QoS, marking the visibility-timeout restore so only its restores count as failed deliveries.

    A delivery the result store acknowledged with its result (``routing.broker.result_acks``) is acked in memory only.
    """

    # overrides kombu 5.7.0 redis QoS.ack (bypassed for result-acked tags); pinned in tests/test_upstream_seams.py
    def ack(self, delivery_tag: str) -> None:
        if result_acks.take(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
            return
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]

    # overrides kombu 5.7.0 redis QoS.reject; pinned in tests/test_upstream_seams.py
    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        result_acks.take(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]

    # overrides kombu 5.7.0 virtual QoS.restore_unacked_once; pinned in tests/test_upstream_seams.py
    def restore_unacked_once(self, stderr: Any = None) -> None:
        if live_worker.is_set() and self._delivered:  # a connection loss: this worker still runs them
            log.warning("broker connection lost: %d held call(s) stay recorded un-acked (this worker runs them)",
                        len(self._delivered))
            return
        super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]

    # overrides kombu 5.7.0 redis QoS.restore_visible; pinned in tests/test_upstream_seams.py
    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        _restoring_invisible.active = True
        try:
            super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            _restoring_invisible.active = False


if TYPE_CHECKING:
    _ChannelBase = kombu_redis.Channel
else:
    _ChannelBase = object


class GuardedChannel(_ChannelBase):
    """The shared client, the poison guard and the delivery count, for any kombu Redis channel."""

    QoS = CountingQoS
    _shared: tuple[Any, Any] | None = None
    _drain_script: Any = None
    _drain_off = False

    # replaces kombu 5.7.0 Channel.conn_or_acquire (a new client per call there); pinned in tests/test_upstream_seams.py
    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._pool is None and self.connection.client is None:
            if self._shared is not None:  # a closed channel's late ack (see live_worker): the old client reconnects
                yield self._shared[1]
                return
            # Closing a channel whose connection is gone already (kombu, after a lost Sentinel primary): a
            # connection error, which the close ignores, not an AttributeError that ends the worker.
            raise redis_lib.ConnectionError("the broker connection is closed")
        pool, shared = self.pool, self._shared
        if shared is None or shared[0] is not pool:  # a new pool (after a reconnect) gets a new client
            shared = self._shared = (pool, self._create_client())  # type: ignore[no-untyped-call]
        yield shared[1]

    # replaces kombu 5.7.0 Channel.subclient; pinned in tests/test_upstream_seams.py
    @cached_property
    def subclient(self) -> Any:
        """kombu's fanout subscription (Celery's broadcasts), raising on a lost connection (connect.py)."""
        client = self._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        return PubSubFailingOnLoss(client.connection_pool, event_dispatcher=client._event_dispatcher)

    # -- poison guard: every popped item is checked before kombu builds a message from it --------

    # a full copy of kombu 5.7.0 Channel._brpop_read; pinned in tests/test_upstream_seams.py (its source's sha256 too)
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
            key = dest.decode() if isinstance(dest, bytes) else dest
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            deliver_popped(self, key, dest, item)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    # a full copy of kombu 5.7.0 Channel._get; pinned in tests/test_upstream_seams.py (its source's sha256 too)
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

    def _deliver_popped(self, item: bytes, queue: str, recorded_tag: str | None = None,
                        envelope: dict[str, Any] | None = None) -> None:
        """Check and deliver one popped item (``envelope``: checked already); ``recorded_tag``: a drain recorded it
        un-acked under this tag."""
        qos: Any = self.qos
        envelope = envelope if envelope is not None else self._checked(item, queue)
        if envelope is None:
            if recorded_tag:
                qos.forget(recorded_tag)
            return
        tag = envelope["properties"]["delivery_tag"]
        if recorded_tag and recorded_tag == tag:
            qos.expect(tag)
        elif recorded_tag:  # the script read it differently: kombu's own write records it
            qos.forget(recorded_tag)
            recorded_tag = None
        if not recorded_tag:
            if qos.popped_as is None:
                qos.popped_as = {}
            qos.popped_as[tag] = item
        try:
            self.connection._deliver(envelope, queue)
        except self._broker_errors:
            raise
        except Exception as exc:  # kombu choked on it (a body that is not base64, ...): not fatal
            properties, headers = envelope["properties"], envelope["headers"]
            what = f"{type(exc).__name__}: {str(exc)[:200]}"
            reason = f"body is not valid base64 ({what})" if isinstance(exc, binascii.Error) else \
                f"delivery failed ({what})"
            self._dead_letter(Letter(queue, reason, item, text_or_none(headers.get("id")),
                                     text_or_none(headers.get("task")), properties.get("reply_to")))
            if tag in qos._delivered:  # recorded as un-acked before it failed
                qos.ack(tag)
            elif recorded_tag:
                qos.forget(tag)
        finally:
            if qos.popped_as:
                qos.popped_as.pop(tag, None)

    def _checked(self, item: bytes, queue: str) -> dict[str, Any] | None:
        """The envelope in ``item``, or None once it has been dead-lettered."""
        try:
            return parse_item(item)
        except NotAnEnvelope as wrong:
            self._dead_letter(Letter(queue, wrong.problem, item, wrong.task_id, wrong.task))
            return None

    # overrides kombu 5.7.0 Channel._deliver_fanout_message; pinned in tests/test_upstream_seams.py
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

    # overrides kombu 5.7.0 Channel._do_restore_message; pinned in tests/test_upstream_seams.py
    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        """kombu's restore; one back by the visibility timeout counts the delivery that did not complete."""
        headers = payload.get("headers") if isinstance(payload, dict) else None
        if isinstance(headers, dict) and getattr(_restoring_invisible, "active", False):
            headers[DELIVERIES_HEADER] = deliveries(headers) + 1
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[no-untyped-call]


class SharedClientChannel(GuardedChannel, kombu_redis.Channel):
    """kombu's Redis channel with :class:`GuardedChannel`'s behaviour."""


class SentinelGuardedChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the same behaviour. A new channel waits (``failover_wait_s``) for the
    sentinels to name a primary that answers: else one opened during a failover fails at once and Celery's
    consumer backs off 2, 4, 6 ... s between attempts (workers came back seconds after the new primary)."""

    # extends kombu 5.7.0 SentinelChannel.from_transport_options; pinned in tests/test_upstream_seams.py
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options,  # type: ignore[assignment]
                              "failover_wait_s")
    #: Longest wait for a primary when a channel is opened (the sentinels agree on one in a few seconds).
    failover_wait_s = 15.0

    # overrides kombu 5.7.0 SentinelChannel._sentinel_managed_pool; pinned in tests/test_upstream_seams.py
    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        pool = super()._sentinel_managed_pool(asynchronous)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + float(self.failover_wait_s)
        while True:
            try:
                redis_lib.Redis(connection_pool=pool).ping()
                return pool
            except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    return pool  # kombu's own retries take over from here
                log.info("waiting for the sentinels to name a primary that answers (%s)", exc)
                pool.disconnect()
                time.sleep(failover_poll_s)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`SharedClientChannel` (``broker_transport`` for ``redis://``)."""

    Channel = SharedClientChannel


class TLSRedisTransport(RedisTransport):
    """The same for ``rediss://``: TLS even when the URL carries no ``ssl_*`` option (kombu turns TLS on from
    the scheme only for a transport it picked itself; its default there does not verify; this one verifies)."""

    # overrides kombu 5.7.0 redis Transport.__init__; pinned in tests/test_upstream_seams.py
    def __init__(self, client: Any, **kwargs: Any) -> None:
        if not client.ssl:
            client.ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with :class:`SentinelGuardedChannel` (``broker_transport`` for ``sentinel://``)."""

    Channel = SentinelGuardedChannel


#: ``broker_transport`` for ``redis://`` brokers.
SHARED_CLIENT_TRANSPORT = f"{__name__}:{RedisTransport.__name__}"
#: ``broker_transport`` for ``rediss://`` brokers.
TLS_TRANSPORT = f"{__name__}:{TLSRedisTransport.__name__}"
#: ``broker_transport`` for ``sentinel://`` brokers.
SENTINEL_TRANSPORT = f"{__name__}:{SentinelTransport.__name__}"
