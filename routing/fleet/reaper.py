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

The moved calls go to the head of the shared queue (the end its workers pop next), the
oldest send first (``routing.fleet.moves``). Every un-acknowledged delivery moved this way
counts in the message's ``flagship_deliveries`` header; at ``FLAGSHIP_MAX_DELIVERIES`` the
message goes to the dead-letter list (``routing.broker.deadletter``) instead, and its call
fails with ``DeadLettered``: a message that kills each worker taking it kills only that many.
An item that cannot be read at all (not UTF-8, not JSON, nested too deep) is dead-lettered
too, and the reap goes on: one bad item never stops a pool's recovery.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis

from routing import names
from routing.broker.envelope import raw_command
from routing.fleet.moves import Wanted, move_to_head
from routing.fleet.registry import remove_worker

log = logging.getLogger(__name__)

#: How long one reaper may hold a dead worker's lock.
reap_lock_ttl_s = 30
#: A reaped node's queue is still watched this long (a producer with a stale view may send to it).
reap_retention_s = 3600.0


def move_unacked(redis: Redis, wanted: Wanted, target: str) -> int:
    """Requeue un-acknowledged deliveries for which ``wanted(delivery_tag, routing_key)`` holds, at ``target``'s head.

    Each counts as a delivery that did not complete; one that reaches ``FLAGSHIP_MAX_DELIVERIES``
    is dead-lettered instead (a message that kills every worker that takes it stops there), and so is
    one that cannot be read. Returns how many were requeued.
    """
    return move_to_head(redis, target, wanted=wanted)


def reap_node(redis: Redis, node: str, pool: str) -> int:
    """Move what a gone incarnation of ``node`` held or had queued to the pool's shared queue."""
    queue, shared = names.worker_queue(node), names.pool_queue(pool)
    held = _holding(redis, node)
    # One move for both: the dead worker's un-acked calls and its queue reach the head together, in send order.
    moved = move_to_head(redis, shared, source_key=queue,
                         wanted=lambda tag, routing_key: routing_key == queue or tag in held)
    if moved:
        log.warning("worker %s is gone: moved %d call(s) it held or had queued to %s", node, moved, pool)
    return moved


def _holding(redis: Redis, node: str) -> set[str]:
    """The delivery tags a worker reported holding in its last heartbeat (none if unreadable)."""
    try:
        held = json.loads(raw_command(redis, "HGET", names.worker_key(node), "holding") or b"[]")
    except Exception:  # a registry entry someone else wrote: the routing key still finds its own calls
        log.warning("worker %s's holding list is unreadable; moving what its queue's routing key names", node)
        return set()
    return {tag for tag in held if isinstance(tag, str)} if isinstance(held, list) else set()


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
