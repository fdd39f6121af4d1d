"""A snapshot of pools, workers, sessions and queue depths (for `flagship status`), on every broker."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from routing import names
from routing.broker.brokers import by_broker
from routing.broker.connect import redis_client, server_address
from routing.broker.deadletter import summary as deadletter_summary
from routing.broker.failures import translated
from routing.fleet.registry import Registry
from routing.fleet.sessions import SessionStore
from routing.fleet.usage import pool_rows, totals
from routing.pools import PoolTable
from routing.settings import Settings, redact_url

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
                # Every call of the pool not started yet: in its queues (shared and direct) or held by a worker
                # for its session's turn. What autoscaling should follow (docs/operations.md).
                "waiting": depth + sum(int(worker_replies[2 * i] or 0) + w.held
                                       for i, w in enumerate(workers) if w.pool == pool.name),
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
        # The LM usage ledger by pool and model (routing.fleet.usage).
        "lm_usage": [{"pool": pool, "model": model, **totals(raw)} for pool, model, raw in pool_rows(redis)],
    }


def fleet_snapshot(default_url: str, settings: Settings, pools: PoolTable) -> dict[str, Any]:
    """:func:`snapshot` of each broker (the default one, then each pool's own), merged.

    Pools, workers and sessions each name their ``broker`` (password masked);
    ``brokers`` lists every broker with its pools, current server (``primary``),
    dead letters and counters; the top-level ``deadletter`` and ``reliability``
    add up all brokers (with one broker: exactly its own).
    """
    parts = []
    for url, table in by_broker(pools, default_url):
        with translated(url):
            redis = redis_client(url, decode_responses=True)
            try:
                parts.append((redact_url(url), url, table, snapshot(redis, settings, table)))
            finally:
                redis.close()
    merged: dict[str, Any] = {"pools": [], "workers": [], "sessions": [], "brokers": []}
    for shown, url, table, data in parts:
        for key in ("pools", "workers", "sessions"):
            merged[key] += [{**entry, "broker": shown} for entry in data[key]]
        merged["brokers"].append({
            "url": shown, "primary": server_address(url), "pools": [p.name for p in table],
            "workers": len(data["workers"]), "sessions": len(data["sessions"]),
            "deadletter": data["deadletter"], "reliability": data["reliability"]})
    order = {name: i for i, name in enumerate(p.name for p in pools)}
    merged["pools"].sort(key=lambda p: order[p["name"]])
    merged["deadletter"] = _added_deadletters([data["deadletter"] for *_, data in parts])
    merged["reliability"] = {name: sum(data["reliability"].get(name, 0) for *_, data in parts)
                             for name in dict.fromkeys(n for *_, data in parts for n in data["reliability"])}
    merged["lm_usage"] = [row for *_, data in parts for row in data["lm_usage"]]
    merged["redis_url"] = redact_url(default_url)
    return merged


def _added_deadletters(summaries: list[dict[str, Any]], newest: int = 5) -> dict[str, Any]:
    """Dead-letter summaries of several brokers as one: counts added, the newest entries of all."""
    if len(summaries) == 1:
        return summaries[0]
    recent = sorted((e for s in summaries for e in s["recent"]), key=lambda e: -float(e.get("at") or 0))
    return {"held": sum(s["held"] for s in summaries), "total": sum(s["total"] for s in summaries),
            "recent": recent[:newest]}
