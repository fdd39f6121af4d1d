"""Where a producer's pending calls are: queued, un-acknowledged (and held by a live worker), or nowhere.

Read by the orphan sweep (``routing.producer.recovery.sweep``) after a worker's death or a
broker failover; one pass scans a pool's queues, kombu's un-acked hash and the
live workers' reports of what they hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from routing import names
from routing.broker.envelope import raw_command, task_id_of, unacked_keys, unacked_parts
from routing.fleet.moves import scan_count

#: Beats of every live worker (after the first look) that must pass without it listing an un-acked call.
beats_to_wait = 2


@dataclass
class Whereabouts:
    """Where a pool's calls are right now (read in this order: queues, un-acked, live holders)."""

    queued: set[str]
    #: Task id -> delivery tag of un-acknowledged deliveries.
    unacked: dict[str, str]
    #: Live node -> (delivery tags it reported holding, its last beat's timestamp).
    holders: dict[str, tuple[set[str], str]]

    def held(self, tag: str) -> bool:
        return any(tag in tags for tags, _ in self.holders.values())


def locate(redis: Redis, pool: str, task_ids: set[str]) -> Whereabouts:
    """Scan the pool's queues, the un-acked hash and the live workers' reports for ``task_ids``."""
    queues = [names.pool_queue(pool)] + [names.worker_queue(node) for node, p in
                                         redis.hgetall(names.DIRECT_QUEUES_KEY).items() if p == pool]
    pipe = redis.pipeline(transaction=False)
    for queue in queues:  # as raw bytes: an item that is not UTF-8 (or not JSON) is simply none of ours
        raw_command(pipe, "LRANGE", queue, 0, -1)
    queued = {task_id for items in pipe.execute() for raw in items if (task_id := task_id_of(raw)) in task_ids}
    unacked = {}
    cursor: Any = 0
    while True:
        cursor, page = raw_command(redis, "HSCAN", unacked_keys().hash, cursor, "COUNT", scan_count)
        for tag, raw in page.items():
            message, _routing_key = unacked_parts(raw)
            if (task_id := task_id_of(message)) in task_ids:
                unacked[task_id] = tag.decode("utf-8", "replace")
        if not int(cursor):
            break
    nodes = sorted(redis.smembers(names.pool_workers_key(pool)))
    pipe = redis.pipeline(transaction=False)
    for node in nodes:
        pipe.exists(names.heartbeat_key(node))
        pipe.hmget(names.worker_key(node), "holding", "last_beat")
    replies = pipe.execute()
    holders = {}
    for i, node in enumerate(nodes):
        live, (holding, last_beat) = replies[2 * i], replies[2 * i + 1]
        if live and last_beat is not None:
            holders[node] = (_tags(holding), last_beat)
    return Whereabouts(queued, unacked, holders)


def _tags(holding: str | None) -> set[str]:
    """The delivery tags in a worker's ``holding`` report (none if it cannot be read)."""
    try:
        tags = json.loads(holding or "[]")
    except Exception:  # a report someone else wrote: the holder is taken to hold nothing
        return set()
    return {tag for tag in tags if isinstance(tag, str)} if isinstance(tags, list) else set()


@dataclass
class Suspect:
    """A pending call not where it should be, since ``since``."""

    missing: bool
    since: float
    tag: str | None = None
    #: Live node -> the distinct beats seen since the call was first seen un-held (the first is the baseline).
    beats: dict[str, set[str]] = field(default_factory=dict)

    def beaten_since(self, where: Whereabouts) -> bool:
        """Every live worker beat twice since the call was first seen un-held, never listing it.

        Twice, not once: a worker lists a call from Celery's ``task_received``, a moment
        after kombu's un-acked record; one beat may fall in between (a newcomer starts
        its baseline).
        """
        for node, (_, beat) in where.holders.items():
            self.beats.setdefault(node, set()).add(beat)
        return all(len(self.beats[node]) > beats_to_wait for node in where.holders)
