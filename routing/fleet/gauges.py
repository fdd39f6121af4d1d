"""The fleet's numbers read from Redis for ``flagship metrics``: pools, workers, queues, sessions (per broker).

:func:`fleet` costs two pipelined round trips plus one ``SMEMBERS`` per pool,
whatever the number of sessions. :func:`sessions` walks every session record
(``SSCAN`` plus one pipelined ``HMGET`` per batch), so callers run it less often.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from redis import Redis

from routing import names
from routing.fleet.registry import Registry, WorkerInfo
from routing.pools import PoolTable
from routing.settings import Settings


@dataclass(frozen=True)
class PoolGauges:
    name: str
    affinity: str
    size: int
    live_workers: int
    #: Registered nodes, live or not yet reaped.
    workers: int


@dataclass(frozen=True)
class WorkerGauges:
    info: WorkerInfo
    refs: int


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    pool: str
    #: ``shared`` (the pool's queue) or ``direct`` (one worker's own).
    kind: str
    depth: int


@dataclass(frozen=True)
class FleetGauges:
    pools: list[PoolGauges]
    workers: list[WorkerGauges]
    queues: list[QueueDepth]
    deadletter: int
    #: ``names.STATS_KEY``: dead-lettered, answered from the store, reruns, resent, orphans requeued (ever).
    reliability: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionGauges:
    #: Pool -> session records (bound or not yet).
    sessions: dict[str, int] = field(default_factory=dict)
    #: Pool -> rehydrations recorded on those sessions.
    rehydrations: dict[str, int] = field(default_factory=dict)


def fleet(redis: Redis, settings: Settings, pools: PoolTable) -> FleetGauges:
    """Pools, registered workers (with refs), every known queue's depth and the dead-letter count."""
    pool_list = list(pools)
    workers = Registry(redis, settings).workers(p.name for p in pool_list)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(names.DIRECT_QUEUES_KEY)
    pipe.llen(names.DEADLETTER_KEY)
    pipe.hgetall(names.STATS_KEY)
    for pool in pool_list:
        pipe.llen(names.pool_queue(pool.name))
    for worker in workers:
        pipe.hget(names.worker_key(worker.node), "refs")
    direct, deadletter, stats, *rest = pipe.execute()
    shared_depths, refs = rest[: len(pool_list)], rest[len(pool_list):]
    # Direct queues of every node ever registered (a dead worker's may still hold calls until reaped).
    direct_pools = {str(node): str(pool) for node, pool in (direct or {}).items()}
    for worker in workers:
        direct_pools.setdefault(worker.node, worker.pool)
    nodes = sorted(direct_pools)
    pipe = redis.pipeline(transaction=False)
    for node in nodes:
        pipe.llen(names.worker_queue(node))
    direct_depths = pipe.execute()
    queues = [QueueDepth(names.pool_queue(p.name), p.name, "shared", int(d or 0))
              for p, d in zip(pool_list, shared_depths)]
    queues += [QueueDepth(names.worker_queue(node), direct_pools[node], "direct", int(d or 0))
               for node, d in zip(nodes, direct_depths)]
    return FleetGauges(
        pools=[PoolGauges(p.name, p.affinity.value, p.size,
                          live_workers=sum(1 for w in workers if w.pool == p.name and w.live),
                          workers=sum(1 for w in workers if w.pool == p.name))
               for p in pool_list],
        workers=[WorkerGauges(w, int(r or 0)) for w, r in zip(workers, refs)],
        queues=queues,
        deadletter=int(deadletter or 0),
        reliability={str(name): int(value) for name, value in (stats or {}).items()},
    )


def sessions(redis: Redis, batch: int = 1000) -> SessionGauges:
    """Session records and their recorded rehydrations, per pool (expired ids are skipped)."""
    counts: Counter[str] = Counter()
    rehydrations: Counter[str] = Counter()
    ids: list[str] = []
    seen: set[str] = set()  # SSCAN may return an id twice

    def flush() -> None:
        pipe = redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.hmget(names.session_key(session_id), "pool", "rehydrations")
        for pool, rehydrated in pipe.execute():
            if pool:
                counts[pool] += 1
                rehydrations[pool] += int(rehydrated or 0)
        ids.clear()

    for session_id in redis.sscan_iter(names.SESSIONS_KEY, count=batch):
        if session_id in seen:
            continue
        seen.add(session_id)
        ids.append(str(session_id))
        if len(ids) >= batch:
            flush()
    if ids:
        flush()
    return SessionGauges(dict(counts), dict(rehydrations))


def merged(parts: list[FleetGauges]) -> FleetGauges:
    """Several brokers' gauges as one fleet (pools and workers are each on one broker; counts add up)."""
    if len(parts) == 1:
        return parts[0]
    reliability: Counter[str] = Counter()
    for part in parts:
        reliability.update(part.reliability)
    return FleetGauges(
        pools=[p for part in parts for p in part.pools], workers=[w for part in parts for w in part.workers],
        queues=[q for part in parts for q in part.queues], deadletter=sum(part.deadletter for part in parts),
        reliability=dict(reliability))


def merged_sessions(parts: list[SessionGauges]) -> SessionGauges:
    """Several brokers' session gauges as one (a pool's sessions are all on its broker)."""
    sessions: Counter[str] = Counter()
    rehydrations: Counter[str] = Counter()
    for part in parts:
        sessions.update(part.sessions)
        rehydrations.update(part.rehydrations)
    return SessionGauges(dict(sessions), dict(rehydrations))
