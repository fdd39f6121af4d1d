"""Draining a burst from a worker's own queue: popped and recorded un-acked in one step.

Celery's consumer takes one message per turn of its event loop: a ``BRPOP``,
then kombu's un-acked write (``QoS.append``), a round trip each, on one thread
that shares the GIL with the task threads. Under a burst of LM calls a call
waited a median 17-23 ms (p90 68-73 ms) between its send and its receipt. For
a ``BRPOP`` from the worker's own queue, :func:`deliver_popped` records the
message un-acked *and* pops the rest of the burst (up to the prefetch room),
recording each, in one script (``drain_direct_queue.lua``) that takes the round
trip kombu's write alone would: a lone call costs what it did, a burst one
round trip. Only a worker's own queue: a shared queue stays one message per
``BRPOP``, fair to the pool's other workers.

No message is ever outside both the queue and the un-acked record: the script
pops and records atomically; a retried call (its reply lost) gets the same
messages back; messages not delivered because delivery failed part-way are put
back at the head of the queue; a message the script could not read, or read
differently, is not recorded by it (kombu's own write records it). A call whose
reply never came (the connection broke, or timed out, after redis-py's own retry)
is remembered with its reply key: the next channel this process opens (the
consumer reconnecting) gives the message ``BRPOP`` took and the burst the script
kept under that key back to the head of the queue, in order, at once rather than
after the visibility timeout. The reply is kept ``reply_ttl_ms``: a connection
down longer leaves the burst to the visibility timeout (or the reaper).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from routing import names
from routing.broker.scripts import source

log = logging.getLogger(__name__)

#: Messages at most one drain takes besides the one ``BRPOP`` returned.
drain_max = 32
#: How long a drain's reply is kept for a retried call (ms).
reply_ttl_ms = 60_000
#: Key prefix of those replies.
REPLY_PREFIX = names.PREFIX + ":drain:"
#: What a script is told when ``RPOP`` takes no count (Redis < 6.2: "Wrong number of args calling Redis command
#: From Lua script"; newer servers word it "... calling command from script"), and what a client is told.
NO_RPOP_COUNT = ("wrong number of args calling", "wrong number of arguments")


@dataclass(frozen=True)
class Stranded:
    """A drain whose reply was lost: what ``BRPOP`` took from ``key`` and the reply key of the script's burst."""

    key: str
    reply_key: str
    tag: str
    item: bytes


#: Drains whose reply was lost, oldest first, given back when this process next opens a channel.
_stranded: list[Stranded] = []
_stranded_lock = threading.Lock()


class HeldCount:
    """What a worker tells the drain script about the calls it holds (received, not started).

    The script sets ``held`` in the worker's registry hash to ``parked()`` plus what it pops, atomically
    with the pop, so the queue's length plus ``held`` never misses a call (producers' ``max_queued``,
    ``routing.producer.recovery.backlog``). Set by the worker at start (``key`` None: not counted).
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.parked: Callable[[], int] = lambda: 0
        #: Drain calls this process completed (their bursts delivered): the heartbeat's own count is
        #: written only if no later drain wrote one (``set_held.lua``).
        self.drains_done = 0


#: This process's worker (one per process).
HELD = HeldCount()


class PrerecordedQoS(kombu_redis.QoS):
    """kombu's QoS; a message a drain recorded un-acked already is only added to the in-memory record.

    A message delivered as popped (``popped_as``) is recorded from the popped bytes, as the drain
    script does, instead of re-encoding kombu's parsed copy: the same entry, no JSON encoding on
    the consumer thread.
    """

    prerecorded: set[str] | None = None
    #: Delivery tag -> the list item it was popped as, while kombu delivers it.
    popped_as: dict[str, bytes | str] | None = None

    # extends kombu 5.7.0 redis QoS.__init__ (a new channel: maybe a reconnect); pinned in tests/test_upstream_seams.py
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        if _stranded:
            give_back_stranded(self)

    # overrides kombu 5.7.0 redis QoS.append (entry reproduced: unacked_entry); pinned in tests/test_upstream_seams.py
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.prerecorded and delivery_tag in self.prerecorded:
            self.prerecorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        item = self.popped_as.pop(delivery_tag, None) if self.popped_as else None
        if item is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        entry = unacked_entry(item, message.delivery_info)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag, entry).execute()
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def expect(self, tag: str) -> None:
        if self.prerecorded is None:
            self.prerecorded = set()
        self.prerecorded.add(tag)

    def forget(self, tag: str) -> None:
        """Remove the un-acked entry a drain wrote for a message that will not be delivered."""
        if self.prerecorded is not None:
            self.prerecorded.discard(tag)
        with self.channel.conn_or_acquire() as client:
            self._remove_from_indices(tag, client.pipeline()).execute()  # type: ignore[no-untyped-call]


def unacked_entry(item: bytes | str, delivery_info: dict[str, Any]) -> bytes:
    """kombu's un-acked entry ``[message, exchange, routing key]`` for a popped item, from its bytes as popped."""
    raw = item.encode() if isinstance(item, str) else item
    return b"".join((b"[", raw, b",", json.dumps(delivery_info["exchange"]).encode(), b",",
                     json.dumps(delivery_info["routing_key"]).encode(), b"]"))


def _drains(channel: Any, queue: str) -> bool:
    """Whether a pop from ``queue`` goes through the script: this worker's own queue, consumed, on a usable channel."""
    return (names.is_worker_queue(queue) and not channel._closing and not channel.global_keyprefix
            and not channel._drain_off and queue in (channel.connection._callbacks or {}))


def deliver_popped(channel: Any, key: str, queue: str, item: bytes) -> None:
    """Deliver ``item``, which a ``BRPOP`` took from ``key`` (of ``queue``).

    From this worker's own queue, one script records it un-acked together with the rest of a burst
    there (popped and recorded likewise), in the round trip kombu's un-acked write alone would take;
    anything else goes through ``channel._deliver_popped`` (``routing.broker.transport.GuardedChannel``) as is.
    """
    if not _drains(channel, queue):
        channel._deliver_popped(item, queue)
        return
    envelope = channel._checked(item, queue)  # parsed once; poison is dead-lettered here
    if envelope is None:
        return
    properties = envelope["properties"]
    tag, entry = properties["delivery_tag"], unacked_entry(item, properties["delivery_info"])
    qos: Any = channel.qos
    room = qos.can_consume_max_estimate()  # kombu's prefetch room (None: no prefetch limit), this item included
    more = drain_max if room is None else max(0, min(room - 1, drain_max))
    reply_key = REPLY_PREFIX + uuid.uuid4().hex
    try:
        with channel.conn_or_acquire() as client:
            if channel._drain_script is None or channel._drain_script.registered_client is not client:
                channel._drain_script = client.register_script(source("drain_direct_queue"))
            held = [HELD.key] if HELD.key else []
            reply = channel._drain_script(keys=[key, qos.unacked_key, qos.unacked_index_key, reply_key, *held],
                                          args=[more, time.time(), reply_ttl_ms, tag, entry, HELD.parked()],
                                          client=client)
    except redis_lib.ResponseError as exc:  # the script wrote nothing: kombu's way for this message
        if no_rpop_count(exc):  # Redis < 6.2: not on this connection
            log.warning("draining %s is off for this connection: %s", queue, exc)
            channel._drain_off = True
        channel._deliver_popped(item, queue, envelope=envelope)
        return
    except (redis_lib.ConnectionError, redis_lib.TimeoutError):
        HELD.drains_done += 1  # it may have run (and counted itself)
        # The script may have run (this message and a burst recorded un-acked, none delivered): given back to the
        # head of the queue by the next channel, once the consumer has reconnected.
        with _stranded_lock:
            _stranded.append(Stranded(key, reply_key, tag, item))
        raise
    popped = [(item, _text(reply[0]), envelope)] + [(more_item, _text(more_tag), None) for more_item, more_tag in
                                                     zip(reply[1::2], reply[2::2], strict=True)]
    try:
        for i, (popped_item, popped_tag, parsed) in enumerate(popped):
            try:
                channel._deliver_popped(popped_item, queue, recorded_tag=popped_tag or None, envelope=parsed)
            except BaseException:
                # Recorded but not delivered (kombu never took it): this one unless kombu has it, and the rest.
                undelivered = [popped_tag] if popped_tag and popped_tag not in qos._delivered else []
                _give_back(qos, undelivered + [later for _, later, _ in popped[i + 1:] if later])
                raise
    finally:
        HELD.drains_done += 1  # after the burst was parked or started: the heartbeat may count again


def no_rpop_count(exc: Exception) -> bool:
    """Whether a drain script failed for an ``RPOP`` without a count (Redis < 6.2)."""
    return any(text in str(exc).lower() for text in NO_RPOP_COUNT)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _give_back(qos: Any, tags: list[str]) -> None:
    """Put recorded, undelivered messages back at the head of their queue, in order (best effort)."""
    for tag in reversed(tags):  # the head is the right end: the oldest goes last
        try:
            qos.restore_by_tag(tag)
        except Exception:  # the visibility timeout brings it back
            log.warning("could not put a drained message back (tag %s); it stays un-acked", tag, exc_info=True)
        if qos.prerecorded is not None:
            qos.prerecorded.discard(tag)


def give_back_stranded(qos: Any) -> None:
    """Put the messages of drains whose reply was lost back at the head of their queues, in order (best effort).

    Each drain's reply key lists what it recorded (the message ``BRPOP`` took first); without one, the script
    either popped nothing more or never ran, and the first message is un-acked or only in this process.
    The newest drain goes back first, so the oldest message ends nearest the head.
    """
    with _stranded_lock:
        stranded, _stranded[:] = list(_stranded), []
    try:
        with qos.channel.conn_or_acquire() as client:
            while stranded:
                lost = stranded[-1]
                reply = client.lrange(lost.reply_key, 0, -1)
                popped = [(lost.item, _text(reply[0]) if reply else lost.tag)] + list(zip(reply[1::2], map(
                    _text, reply[2::2]), strict=True))
                for item, tag in reversed(popped):
                    if tag and client.hexists(qos.unacked_key, tag):
                        qos.restore_by_tag(tag, client=client)
                    elif not tag or not reply:  # never recorded: it was only in this process (or the reply)
                        client.rpush(lost.key, item)
                client.delete(lost.reply_key)
                stranded.pop()
                log.warning("gave back %d drained message(s) of %s whose reply was lost", len(popped), lost.key)
    except Exception:  # the connection is not back yet: the next channel tries again
        log.warning("could not give back drained messages whose reply was lost yet", exc_info=True)
        with _stranded_lock:
            _stranded[:0] = stranded
