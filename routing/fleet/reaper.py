"""Moving the calls a dead worker held or had queued to its pool's shared queue, once.

Whoever first notices a worker's heartbeat is gone (a producer's watch or a peer's
heartbeat loop) takes a short lock and moves: the messages waiting in the dead
worker's direct queue, and its deliveries that were never acknowledged (those
routed from its direct queue, and the ones it reported holding in its last
heartbeat, whichever queue they came from). A worker restarting under the same
node name does the same for its previous incarnation before it registers.

A strict call moved this way is refused by the worker that receives it (its
session's state is gone); a hint call simply runs there. Calls a worker received
in its last heartbeat interval and held from the shared queue come back when
kombu's visibility timeout expires.

Every un-acknowledged delivery moved this way counts in the message's
``flagship_deliveries`` header; at ``FLAGSHIP_MAX_DELIVERIES`` the message goes to the
dead-letter list (``routing.broker.deadletter``) instead, and its call fails with
``DeadLettered``: a message that kills each worker taking it kills only that many.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis as redis_lib
from redis import Redis

from routing import names
from routing.broker.deadletter import DELIVERIES_HEADER, DeadLetterSettings, Letter, announce, deliveries, record
from routing.broker.envelope import UNACKED_INDEX_KEY, UNACKED_KEY
from routing.fleet.registry import remove_worker

log = logging.getLogger(__name__)

#: How long one reaper may hold a dead worker's lock.
reap_lock_ttl_s = 30
#: A reaped node's queue is still watched this long (a producer with a stale view may send to it).
reap_retention_s = 3600.0


def _retarget(raw: str, queue: str, delivered: bool = False) -> str:
    """Point a queued Celery message at ``queue`` so a later redelivery goes there too.

    ``delivered``: a worker took it and died before completing it; count that delivery (and mark it
    redelivered, as kombu's own restore does). What is not an envelope moves unchanged: the worker
    that takes it next dead-letters it.
    """
    try:
        message = json.loads(raw)
        properties = message.setdefault("properties", {})
        info = properties.setdefault("delivery_info", {})
        info["exchange"] = queue
        info["routing_key"] = queue
        if delivered:
            headers = message.setdefault("headers", {})
            headers[DELIVERIES_HEADER] = deliveries(headers) + 1
            headers["redelivered"] = info["redelivered"] = True
        return json.dumps(message)
    except (ValueError, TypeError, AttributeError):
        return raw


def _over_delivered(raw: str, settings: DeadLetterSettings) -> Letter | None:
    """A dead-letter entry for a taken message whose next delivery would exceed ``max_deliveries``."""
    try:
        message = json.loads(raw)
        headers = message["headers"]
        count = deliveries(headers) + 1
        queue = message["properties"]["delivery_info"]["routing_key"]
        reply_to = message["properties"].get("reply_to")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if count < settings.max_deliveries or not isinstance(headers, dict):
        return None
    task_id, task = headers.get("id"), headers.get("task")
    return Letter(str(queue), f"delivered {count} times without completing (limit {settings.max_deliveries}); "
                  "each time its worker died", raw, task_id if isinstance(task_id, str) else None,
                  task if isinstance(task, str) else None, reply_to)


def _move_one(redis: Redis, watched: str, read: Callable[[Redis], str | None],
              take: Callable[[Redis], None], place: Callable[[Redis, str], Letter | None]) -> bool | None:
    """Atomically take one message (read under WATCH) and ``place`` it (push it on, or dead-letter it).

    Returns True if moved, False if there was nothing to move, None on a conflict (retry).
    """
    with redis.pipeline() as pipe:
        try:
            pipe.watch(watched)
            raw = read(pipe)
            if raw is None:
                return False
            pipe.multi()
            take(pipe)
            letter = place(pipe, raw)
            pipe.execute()
        except redis_lib.WatchError:
            return None
    if letter is not None:
        announce(letter)
    return True


def move_queue(redis: Redis, source: str, target: str) -> int:
    """Move every message from ``source`` to ``target``, oldest first, each move atomic."""

    def place(pipe: Redis, raw: str) -> None:
        pipe.lpush(target, _retarget(raw, target))

    moved = 0
    while (result := _move_one(redis, source, lambda p: p.lindex(source, -1), lambda p: p.rpop(source),
                               place)) is not False:
        moved += bool(result)
    return moved


def move_unacked(redis: Redis, wanted: Callable[[str, str], bool], target: str) -> int:
    """Requeue un-acknowledged deliveries for which ``wanted(delivery_tag, routing_key)`` holds.

    Each counts as a delivery that did not complete; one that reaches ``FLAGSHIP_MAX_DELIVERIES``
    is dead-lettered instead (a message that kills every worker that takes it stops there).
    Returns how many were requeued.
    """
    settings = DeadLetterSettings.from_env()
    moved = 0
    for tag, raw in redis.hscan_iter(UNACKED_KEY):
        try:
            _payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            log.warning("un-acked entry %s is not kombu's [message, exchange, routing_key]; left alone", tag)
            continue
        if not wanted(tag, routing_key):
            continue

        def read(pipe: Redis, tag: str = tag) -> str | None:
            current = pipe.hget(UNACKED_KEY, tag)
            return None if current is None else json.dumps(json.loads(current)[0])

        def take(pipe: Redis, tag: str = tag) -> None:
            pipe.hdel(UNACKED_KEY, tag)
            pipe.zrem(UNACKED_INDEX_KEY, tag)

        requeued = True

        def place(pipe: Redis, raw: str) -> Letter | None:
            nonlocal requeued
            letter = _over_delivered(raw, settings)
            requeued = letter is None
            if letter is None:
                pipe.lpush(target, _retarget(raw, target, delivered=True))
            else:
                record(pipe, letter, settings)
            return letter

        while (result := _move_one(redis, UNACKED_KEY, read, take, place)) is None:
            pass
        moved += bool(result) and requeued
    return moved


def reap_node(redis: Redis, node: str, pool: str) -> int:
    """Move what a gone incarnation of ``node`` held or had queued to the pool's shared queue."""
    queue, shared = names.worker_queue(node), names.pool_queue(pool)
    held = set(json.loads(redis.hget(names.worker_key(node), "holding") or "[]"))
    moved = move_unacked(redis, lambda tag, routing_key: routing_key == queue or tag in held, shared)
    moved += move_queue(redis, queue, shared)
    if moved:
        log.warning("worker %s is gone: moved %d call(s) it held or had queued to %s", node, moved, pool)
    return moved


def reap_dead_workers(redis: Redis, pool: str | None = None) -> dict[str, int]:
    """Reap every known worker without a heartbeat; returns messages moved per node."""
    entries = {node: p for node, p in redis.hgetall(names.DIRECT_QUEUES_KEY).items() if pool in (None, p)}
    if not entries:
        return {}
    reaped_at = redis.hgetall(names.REAPED_KEY)
    pipe = redis.pipeline(transaction=False)
    for node in entries:
        pipe.exists(names.heartbeat_key(node))
        pipe.llen(names.worker_queue(node))
        pipe.exists(names.worker_key(node))
    replies = pipe.execute()
    reaped = {}
    now = time.time()
    for i, (node, node_pool) in enumerate(entries.items()):
        live, queued, registered = replies[3 * i: 3 * i + 3]
        if live:
            continue
        if not (queued or registered):
            if node not in reaped_at:  # stopped cleanly before we first looked: start its retention now
                redis.hsetnx(names.REAPED_KEY, node, now)
            elif now - float(reaped_at[node]) > reap_retention_s:
                redis.hdel(names.DIRECT_QUEUES_KEY, node)
                redis.hdel(names.REAPED_KEY, node)
            continue
        with reap_lock(redis, node, wait_s=0) as locked:
            # Re-check under the lock: a new run of the node may have registered meanwhile.
            if not locked or redis.exists(names.heartbeat_key(node)):
                continue
            reaped[node] = reap_node(redis, node, node_pool)
            pipe = redis.pipeline()
            remove_worker(pipe, node, node_pool, now)
            pipe.execute()
    return reaped


@contextmanager
def reap_lock(redis: Redis, node: str, wait_s: float) -> Iterator[bool]:
    """Hold the node's reap lock (yields False if it could not be had within ``wait_s``).

    Reapers and a new run of the node registering itself take it, so a reap never
    overlaps a registration.
    """
    key, token = names.reap_lock_key(node), uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while not (locked := bool(redis.set(key, token, nx=True, ex=reap_lock_ttl_s))) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield locked
    finally:
        if locked and redis.get(key) == token:
            redis.delete(key)
