"""Session records in Redis: open, bind to the least-loaded live worker, rebind, close.

With Sentinel, writing a record (open, bind, rebind) waits for a replica
(``routing.broker.connect.execute_replicated``), so a failover right after keeps it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis import Redis

from routing import names, validate
from routing.broker.connect import execute_replicated
from routing.broker.scripts import Scripts
from routing.errors import NoCapableWorker, SessionNotFound
from routing.pools import Affinity, Pool

_WORKER_PREFIX = names.worker_key("")
_HEARTBEAT_PREFIX = names.heartbeat_key("")


@dataclass(frozen=True)
class SessionRecord:
    id: str
    pool: str
    affinity: Affinity
    worker: str | None
    #: The run of the worker the session's state lives in (see ``WorkerInfo.incarnation``).
    incarnation: str | None
    created: float
    last_used: float
    ttl_s: float

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> SessionRecord:
        return cls(
            id=data["id"],
            pool=data["pool"],
            affinity=Affinity(data["affinity"]),
            worker=data.get("worker") or None,
            incarnation=data.get("incarnation") or None,
            created=float(data.get("created", 0)),
            last_used=float(data.get("last_used", 0)),
            ttl_s=float(data.get("ttl_s", 0)),
        )


def check_record(session_id: str, ttl_s: float) -> None:
    """Refuse, before anything is written, an id that could collide in the key space or a TTL Redis would reject."""
    validate.session_id(session_id)
    validate.ttl(ttl_s)


class SessionStore:
    def __init__(self, redis: Redis, scripts: Scripts | None = None) -> None:
        self.redis = redis
        self.scripts = scripts or Scripts(redis)

    def create(self, session_id: str, pool: Pool, affinity: Affinity, ttl_s: float) -> None:
        """Write an unbound record (lazy binding binds on the first call)."""
        check_record(session_id, ttl_s)
        now = time.time()
        key = names.session_key(session_id)
        pipe = self.redis.pipeline(transaction=False)  # one connection, in order; WAIT covers it
        pipe.hsetnx(key, "created", now)
        pipe.hset(key, mapping={"id": session_id, "pool": pool.name, "affinity": affinity.value,
                                "ttl_s": ttl_s, "last_used": now})
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.sadd(names.SESSIONS_KEY, session_id)
        execute_replicated(self.redis, pipe)

    def bind(
        self,
        session_id: str,
        pool: Pool,
        affinity: Affinity,
        ttl_s: float,
        *,
        prefer: str | None = None,
        exclude: str | None = None,
    ) -> tuple[str, str]:
        """Keep a usable binding, else bind to the least-loaded live worker; returns (node, incarnation)."""
        check_record(session_id, ttl_s)
        pipe = self.redis.pipeline(transaction=False)
        self.scripts.bind_session(
            keys=[names.pool_workers_key(pool.name), names.session_key(session_id), names.SESSIONS_KEY],
            args=[session_id, pool.name, affinity.value, time.time(), int(ttl_s * 1000),
                  json.dumps(list(pool.requires)), _WORKER_PREFIX, _HEARTBEAT_PREFIX,
                  prefer or "", exclude or "", ttl_s],
            client=pipe,
        )
        status, value, *incarnation = execute_replicated(self.redis, pipe)[0]
        if status != "ok":
            raise NoCapableWorker(pool.name, list(pool.requires))
        return str(value), str(incarnation[0])

    def get(self, session_id: str) -> SessionRecord:
        data = self.redis.hgetall(names.session_key(session_id))
        if not data or "pool" not in data:
            raise SessionNotFound(session_id)
        return SessionRecord.from_hash(data)

    def exists(self, session_id: str) -> bool:
        return bool(self.redis.hexists(names.session_key(session_id), "pool"))

    def alive(self, ids: list[str]) -> list[bool]:
        """Which of ``ids`` still have a record (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.exists(names.session_key(session_id))
        return [bool(found) for found in pipe.execute()]

    def prune_worker(self, node: str) -> int:
        """Drop expired sessions from a worker's bound set (its load); returns how many remain."""
        key = names.worker_sessions_key(node)
        ids = list(self.redis.smembers(key))
        gone = [sid for sid, alive in zip(ids, self.alive(ids)) if not alive]
        if gone:
            self.redis.srem(key, *gone)
            self.redis.srem(names.SESSIONS_KEY, *gone)
        return len(ids) - len(gone)

    def rebind(self, session_id: str, node: str, incarnation: str) -> str | None:
        """Point the session at ``node``; returns the previous node (None if the session is gone)."""
        pipe = self.redis.pipeline(transaction=False)
        self.scripts.rebind_session(
            keys=[names.session_key(session_id)], args=[session_id, node, _WORKER_PREFIX, time.time(), incarnation],
            client=pipe,
        )
        previous = execute_replicated(self.redis, pipe)[0]
        return previous or None

    def close(self, session_id: str) -> str | None:
        """Delete the record; returns the node it was bound to, or None if it did not exist."""
        node = self.scripts.close_session(
            keys=[names.session_key(session_id), names.SESSIONS_KEY, names.session_recipes_key(session_id),
                  names.session_contexts_key(session_id)],
            args=[session_id, _WORKER_PREFIX],
        )
        if node is None:
            return None
        return node or ""

    def touch(self, ttls: dict[str, float], pipeline: Redis | None = None) -> None:
        """Renew the inactivity TTL of sessions that just ran calls (batched by workers)."""
        pipe = pipeline if pipeline is not None else self.redis.pipeline()
        now = time.time()
        for session_id, ttl_s in ttls.items():
            keys = [names.session_key(session_id), names.session_recipes_key(session_id),
                    names.session_contexts_key(session_id)]
            self.scripts.touch_session(keys=keys, args=[now, int(ttl_s * 1000)], client=pipe)
        if pipeline is None:
            pipe.execute()

    def all(self) -> list[SessionRecord]:
        ids = sorted(self.redis.smembers(names.SESSIONS_KEY))
        return [r for r in self.many(ids) if r is not None]

    def many(self, ids: Iterable[str]) -> list[SessionRecord | None]:
        ids = list(ids)
        pipe = self.redis.pipeline()
        for session_id in ids:
            pipe.hgetall(names.session_key(session_id))
        return [SessionRecord.from_hash(d) if d and "pool" in d else None for d in pipe.execute()]
