"""Draining a burst from a worker's own queue: the rest of it popped and recorded un-acked in one step.

Celery's consumer takes one message per turn of its event loop: a ``BRPOP``,
then kombu's un-acked write (``QoS.append``), a round trip each, on one thread
that shares the GIL with the task threads. Under a burst of LM calls a call
waited a median 17-23 ms (p90 68-73 ms) between its send and its receipt. After
a ``BRPOP`` from the worker's own queue, :func:`drain_own_queue` pops the rest
of the burst (up to the prefetch room) and records each message un-acked, in
one script (``drain_direct_queue.lua``): 7.5-8.5 ms (p90 32-34 ms). Only a
worker's own queue: a shared queue stays one message per ``BRPOP``, fair to the
pool's other workers. Only while the worker has other messages in flight (a lone
call is not a burst) and not within 20 ms of a drain that found nothing, so calls
one at a time cost no extra round trip.

No message is ever outside both the queue and the un-acked record: the script
pops and records atomically; a retried call (its reply lost) gets the same
messages back; messages not delivered because delivery failed part-way are put
back at the head of the queue; a message the script could not read, or read
differently, is not recorded by it (kombu's own write records it).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import redis as redis_lib
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from routing import names
from routing.scripts import source

log = logging.getLogger(__name__)

#: Messages at most one drain takes besides the one ``BRPOP`` returned.
drain_max = 32
#: How long a drain's reply is kept for a retried call (ms).
reply_ttl_ms = 60_000
#: After a drain that found nothing, no drain for this long (a steady trickle is taken by BRPOP alone).
quiet_after_empty_s = 0.02
#: Key prefix of those replies.
REPLY_PREFIX = names.PREFIX + ":drain:"


class PrerecordedQoS(kombu_redis.QoS):
    """kombu's QoS; a message a drain recorded un-acked already is only added to the in-memory record.

    A message delivered as popped (``popped_as``) is recorded from the popped bytes, as the drain
    script does, instead of re-encoding kombu's parsed copy: the same entry, no JSON encoding on
    the consumer thread.
    """

    prerecorded: set[str] | None = None
    #: Delivery tag -> the list item it was popped as, while kombu delivers it.
    popped_as: dict[str, bytes | str] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.prerecorded and delivery_tag in self.prerecorded:
            self.prerecorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        item = self.popped_as.pop(delivery_tag, None) if self.popped_as else None
        if item is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        raw = item.encode() if isinstance(item, str) else item
        entry = b"".join((b"[", raw, b",", json.dumps(delivery["exchange"]).encode(), b",",
                          json.dumps(delivery["routing_key"]).encode(), b"]"))
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


def drain_own_queue(channel: Any, key: str, queue: str) -> None:
    """After a ``BRPOP`` from ``key`` (of ``queue``): the rest of a burst there, if it is this worker's own.

    ``channel``: a ``routing.transport.GuardedChannel`` (it calls its ``_deliver_popped``).
    """
    if not names.is_worker_queue(queue) or channel._closing or channel.global_keyprefix:
        return
    if queue not in (channel.connection._callbacks or {}):  # not consuming it (any more): leave it queued
        return
    qos: Any = channel.qos
    if len(qos._delivered) < 2 or time.monotonic() < channel._drain_quiet_until:
        return  # a lone call (nothing else in flight), or the last drain found nothing: no round trip
    room = qos.can_consume_max_estimate()  # kombu's prefetch room (None: no prefetch limit)
    room = drain_max if room is None else room
    if room <= 0:
        return
    with channel.conn_or_acquire() as client:
        if channel._drain_script is None or channel._drain_script.registered_client is not client:
            channel._drain_script = client.register_script(source("drain_direct_queue"))
        try:
            reply = channel._drain_script(
                keys=[key, qos.unacked_key, qos.unacked_index_key, REPLY_PREFIX + uuid.uuid4().hex],
                args=[min(room, drain_max), time.time(), reply_ttl_ms], client=client)
        except redis_lib.ResponseError as exc:  # a server without RPOP's count (Redis < 6.2): pop one by one
            log.warning("draining %s is off for this connection: %s", queue, exc)
            channel._drain_quiet_until = float("inf")
            return
    if not reply:
        channel._drain_quiet_until = time.monotonic() + quiet_after_empty_s
        return
    popped = [(item, tag.decode() if isinstance(tag, bytes) else str(tag))
              for item, tag in zip(reply[0::2], reply[1::2], strict=True)]
    for i, (item, tag) in enumerate(popped):
        try:
            channel._deliver_popped(item, queue, recorded_tag=tag or None)
        except BaseException:
            _give_back(qos, [later for _, later in popped[i + 1:] if later])
            raise


def _give_back(qos: Any, tags: list[str]) -> None:
    """Put recorded, undelivered messages back at the head of their queue, in order (best effort)."""
    for tag in reversed(tags):  # the head is the right end: the oldest goes last
        try:
            qos.restore_by_tag(tag)
        except Exception:  # the visibility timeout brings it back
            log.warning("could not put a drained message back (tag %s); it stays un-acked", tag, exc_info=True)
        if qos.prerecorded is not None:
            qos.prerecorded.discard(tag)
