"""A snapshot of pools, workers, sessions and queue depths (for `flagship status`)."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from routing import names
from routing.deadletter import summary as deadletter_summary
from routing.pools import PoolTable
from routing.registry import Registry
from routing.sessions import SessionStore
from routing.settings import Settings

#: Fleet-wide counters in ``names.STATS_KEY``, shown even before they first count.
RELIABILITY_COUNTERS = ("dead_lettered", "answered_from_store", "reruns", "resent", "orphans_requeued")


def reliability_counters(redis: Redis) -> dict[str, int]:
    """What the fleet did to lose nothing: dead letters, calls answered from the store, reruns, resends."""
    counted = {name: int(value) for name, value in redis.hgetall(names.STATS_KEY).items()}
    return {**dict.fromkeys(RELIABILITY_COUNTERS, 0), **counted}


def snapshot(redis: Redis, settings: Settings, pools: PoolTable) -> dict[str, Any]:
    registry = Registry(redis, settings)
    workers = registry.workers(p.name for p in pools)
    sessions = SessionStore(redis).all()
    pipe = redis.pipeline(transaction=False)
    for pool in pools:
        pipe.llen(names.pool_queue(pool.name))
    for worker in workers:
        pipe.llen(worker.queue)
        pipe.hget(names.worker_key(worker.node), "refs")
    replies = pipe.execute()
    pool_depths = replies[: len(list(pools))]
    worker_replies = replies[len(pool_depths):]
    now = time.time()
    return {
        "pools": [
            {
                "name": pool.name, "affinity": pool.affinity.value, "size": pool.size,
                "requires": list(pool.requires), "queue": names.pool_queue(pool.name), "queued": depth,
                "live_workers": sum(1 for w in workers if w.pool == pool.name and w.live),
            }
            for pool, depth in zip(pools, pool_depths)
        ],
        "workers": [
            {**w.as_dict(), "queued": worker_replies[2 * i], "refs": int(worker_replies[2 * i + 1] or 0)}
            for i, w in enumerate(workers)
        ],
        "sessions": [
            {"id": s.id, "pool": s.pool, "affinity": s.affinity.value, "worker": s.worker,
             "idle_s": round(now - s.last_used, 1), "ttl_s": s.ttl_s}
            for s in sessions
        ],
        # Messages no worker could run: held in the list, dead-lettered ever, the newest few.
        "deadletter": deadletter_summary(redis),
        # reruns: calls a dead worker had taken that ran again (possible duplicate executions, an upper bound).
        "reliability": reliability_counters(redis),
    }
