"""The live worker registry: what each worker reports about itself, and who is live."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis

from routing import names
from routing.broker.scripts import source
from routing.settings import Settings


@dataclass(frozen=True)
class WorkerInfo:
    node: str
    pool: str
    host: str
    pid: int
    queue: str
    capabilities: tuple[str, ...] = ()
    #: Program modules the worker imported at start (``FLAGSHIP_PROGRAMS``).
    programs: tuple[str, ...] = ()
    concurrency: int = 1
    started: float = field(default_factory=time.time)
    #: Tells one run of a node from the next under the same name (its refs died with the last one).
    incarnation: str = ""
    in_flight: int = 0
    #: Calls received and waiting for their session's turn (parked: no thread), as of the last heartbeat.
    held: int = 0
    sessions: int = 0
    last_beat: float = 0.0
    live: bool = False

    @property
    def heartbeat_age_s(self) -> float | None:
        return round(time.time() - self.last_beat, 3) if self.last_beat else None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["capabilities"] = list(self.capabilities)
        data["programs"] = list(self.programs)
        data["heartbeat_age_s"] = self.heartbeat_age_s
        return data

    @classmethod
    def from_hash(cls, data: dict[str, str], *, live: bool, sessions: int) -> WorkerInfo:
        return cls(
            node=data["node"],
            pool=data["pool"],
            host=data.get("host", ""),
            pid=int(data.get("pid", 0)),
            queue=data.get("queue", names.worker_queue(data["node"])),
            capabilities=tuple(json.loads(data.get("capabilities", "[]"))),
            programs=tuple(json.loads(data.get("programs", "[]"))),
            concurrency=int(data.get("concurrency", 1)),
            started=float(data.get("started", 0)),
            incarnation=data.get("incarnation", ""),
            in_flight=int(data.get("in_flight", 0)),
            held=int(data.get("held", 0)),
            sessions=sessions,
            last_beat=float(data.get("last_beat", 0)),
            live=live,
        )


@dataclass(frozen=True)
class Liveness:
    """The part of a worker's state a producer routes on."""

    live: bool
    in_flight: int
    concurrency: int
    #: Shutting down: finishing its calls, taking no new ones.
    draining: bool = False
    #: The run of the node this view describes (None when not live).
    incarnation: str | None = None

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.concurrency

    @property
    def accepting(self) -> bool:
        """New calls may be sent to it."""
        return self.live and not self.draining

    def same_run(self, incarnation: str | None) -> bool:
        """Whether this is the run ``incarnation`` names (unknown on either side counts as the same)."""
        return not (incarnation and self.incarnation and self.incarnation != incarnation)


def remove_worker(pipe: Redis, node: str, pool: str, when: float) -> None:
    """The deregister steps (clean shutdown or reaping): the node stops being live and bindable.

    Its direct queue stays known, marked reaped at ``when``: producers with a stale
    view may still send to it, so it is watched for a while, then forgotten.
    """
    pipe.delete(names.heartbeat_key(node), names.worker_key(node), names.worker_sessions_key(node))
    pipe.srem(names.pool_workers_key(pool), node)
    pipe.hset(names.REAPED_KEY, node, when)


class Registry:
    _set_held: Any = None

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def register(self, info: WorkerInfo) -> None:
        """Publish the worker and its first heartbeat (it becomes bindable at once)."""
        pipe = self.redis.pipeline()
        pipe.hset(names.worker_key(info.node), mapping={
            "node": info.node, "pool": info.pool, "host": info.host, "pid": info.pid,
            "queue": info.queue, "capabilities": json.dumps(list(info.capabilities)),
            "programs": json.dumps(list(info.programs)),
            "concurrency": info.concurrency, "started": info.started,
            "in_flight": info.in_flight, "last_beat": time.time(), "draining": 0,
            "incarnation": info.incarnation, "holding": "[]",
        })
        pipe.sadd(names.pool_workers_key(info.pool), info.node)
        pipe.hset(names.DIRECT_QUEUES_KEY, info.node, info.pool)
        pipe.hdel(names.REAPED_KEY, info.node)
        pipe.set(names.heartbeat_key(info.node), info.incarnation, px=self._ttl_ms)
        pipe.execute()

    def beat(
        self, node: str, incarnation: str, in_flight: int, holding: list[str], pipeline: Redis,
        extra: dict[str, int] | None = None, held: tuple[int, int] | None = None,
    ) -> None:
        """Renew liveness and publish load; queues an ``HEXISTS`` whose reply says if still registered."""
        pipeline.set(names.heartbeat_key(node), incarnation, px=self._ttl_ms)
        pipeline.hexists(names.worker_key(node), "node")
        pipeline.hset(names.worker_key(node), mapping={
            "in_flight": in_flight, "last_beat": time.time(), "holding": json.dumps(holding), **(extra or {}),
        })
        if held is not None:  # (calls received and not started, drains completed when counted): set_held.lua
            if self._set_held is None:
                self._set_held = self.redis.register_script(source("set_held"))
            self._set_held(keys=[names.worker_key(node)], args=list(held), client=pipeline)

    def another_run_is_live(self, node: str) -> bool:
        """Whether a live worker already uses ``node``: its heartbeat gets renewed while we watch.

        A heartbeat left by a killed run of the same name runs out instead, so the
        wait is bounded by the heartbeat TTL, and only a start under a name that
        still has a heartbeat waits at all.
        """
        key = names.heartbeat_key(node)
        last = self.redis.pttl(key)
        while last > 0:
            time.sleep(0.05)
            current = self.redis.pttl(key)
            if current > last:
                return True
            last = current
        return False

    def drain(self, node: str) -> None:
        """Shutdown began: no new sessions or calls; calls already here still finish."""
        self.redis.hset(names.worker_key(node), "draining", 1)

    def deregister(self, node: str, pool: str) -> None:
        """Clean shutdown done: the worker stops being live at once (no TTL wait).

        Its sessions keep pointing at it, so strict ones fail fast (or rehydrate)
        and hint ones move on with their next call.
        """
        pipe = self.redis.pipeline()
        remove_worker(pipe, node, pool, time.time())
        pipe.execute()

    def liveness(self, nodes: Iterable[str]) -> dict[str, Liveness]:
        """One round trip for the routing view of ``nodes``."""
        nodes = list(nodes)
        pipe = self.redis.pipeline(transaction=False)
        for node in nodes:
            pipe.get(names.heartbeat_key(node))
            pipe.hmget(names.worker_key(node), "in_flight", "concurrency", "draining")
        replies = pipe.execute()
        view = {}
        for i, node in enumerate(nodes):
            incarnation, (in_flight, concurrency, draining) = replies[2 * i], replies[2 * i + 1]
            view[node] = Liveness(incarnation is not None, int(in_flight or 0), int(concurrency or 1),
                                  draining == "1", incarnation)
        return view

    def workers(self, pools: Iterable[str]) -> list[WorkerInfo]:
        nodes = [(pool, node) for pool in pools for node in sorted(self.redis.smembers(names.pool_workers_key(pool)))]
        pipe = self.redis.pipeline(transaction=False)
        for _, node in nodes:
            pipe.hgetall(names.worker_key(node))
            pipe.exists(names.heartbeat_key(node))
            pipe.scard(names.worker_sessions_key(node))
        replies = pipe.execute()
        infos = []
        for i, _ in enumerate(nodes):
            data, live, sessions = replies[3 * i: 3 * i + 3]
            if data:
                infos.append(WorkerInfo.from_hash(data, live=bool(live), sessions=int(sessions)))
        return infos

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.heartbeat_ttl_s * 1000)
