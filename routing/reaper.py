"""Moving the calls queued for a dead worker to its pool's shared queue, once.

Whoever first notices a worker's heartbeat is gone (a producer's watcher or a
peer's heartbeat loop) takes a short lock and moves the messages. A strict call
moved this way is refused by the worker that receives it (its session's state is
gone); a hint call simply runs there.
"""

from __future__ import annotations

import json
import logging

import redis as redis_lib
from redis import Redis

from routing import names

log = logging.getLogger(__name__)

#: How long one reaper may hold a dead worker's lock.
reap_lock_ttl_s = 30
#: Kombu's Redis transport keeps deliveries not yet acknowledged here (its defaults).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def _retarget(raw: str, queue: str) -> str:
    """Point a queued Celery message at ``queue`` so a later redelivery goes there too."""
    message = json.loads(raw)
    info = message.setdefault("properties", {}).setdefault("delivery_info", {})
    info["exchange"] = queue
    info["routing_key"] = queue
    return json.dumps(message)


def move_queue(redis: Redis, source: str, target: str) -> int:
    """Move every message from ``source`` to ``target``, oldest first, each move atomic."""
    moved = 0
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(source)
                raw = pipe.lindex(source, -1)
                if raw is None:
                    return moved
                pipe.multi()
                pipe.rpop(source)
                pipe.lpush(target, _retarget(raw, target))
                pipe.execute()
                moved += 1
            except redis_lib.WatchError:
                continue


def move_unacked(redis: Redis, source: str, target: str) -> int:
    """Requeue deliveries taken from ``source`` and never acknowledged (their worker died).

    Only the dead worker consumed its direct queue, so every un-acked delivery
    routed from it was held by that worker. Kombu's Redis transport would restore
    them to the dead queue after the visibility timeout; this moves them now.
    """
    moved = 0
    for tag, raw in redis.hscan_iter(UNACKED_KEY):
        payload, _exchange, routing_key = json.loads(raw)
        if routing_key != source:
            continue
        with redis.pipeline() as pipe:
            try:
                pipe.watch(UNACKED_KEY)
                if pipe.hget(UNACKED_KEY, tag) is None:
                    continue
                pipe.multi()
                pipe.hdel(UNACKED_KEY, tag)
                pipe.zrem(UNACKED_INDEX_KEY, tag)
                pipe.lpush(target, _retarget(json.dumps(payload), target))
                pipe.execute()
                moved += 1
            except redis_lib.WatchError:
                continue
    return moved


def reap_dead_workers(redis: Redis, pool: str | None = None) -> dict[str, int]:
    """Reap every registered worker without a heartbeat; returns messages moved per node."""
    entries = {node: p for node, p in redis.hgetall(names.DIRECT_QUEUES_KEY).items() if pool in (None, p)}
    if not entries:
        return {}
    pipe = redis.pipeline(transaction=False)
    for node in entries:
        pipe.exists(names.heartbeat_key(node))
        pipe.llen(names.worker_queue(node))
        pipe.exists(names.worker_key(node))
    replies = pipe.execute()
    reaped = {}
    for i, (node, node_pool) in enumerate(entries.items()):
        live, queued, registered = replies[3 * i: 3 * i + 3]
        if live or not (queued or registered):
            continue
        if not redis.set(names.reap_lock_key(node), 1, nx=True, ex=reap_lock_ttl_s):
            continue
        try:
            queue, shared = names.worker_queue(node), names.pool_queue(node_pool)
            moved = move_unacked(redis, queue, shared) + move_queue(redis, queue, shared)
            if not redis.exists(names.heartbeat_key(node)):
                redis.delete(names.worker_key(node))
                redis.srem(names.pool_workers_key(node_pool), node)
            reaped[node] = moved
            if moved:
                log.warning("worker %s is gone: moved %d queued call(s) to %s", node, moved, node_pool)
        finally:
            redis.delete(names.reap_lock_key(node))
    return reaped
