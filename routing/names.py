"""Every queue name and Redis key, derived in one place."""

from __future__ import annotations

import re
import socket
from typing import Any

#: Prefix of every Redis key the system owns (Celery's own keys are left as Celery names them).
PREFIX = "flagship"

#: Celery task that runs an operation of a session.
CALL_TASK = "flagship.call"
#: Plain no-op task, the baseline routing is measured against.
NOOP_TASK = "flagship.noop"

#: Hash of worker-reported fields.
WORKER_KEY = PREFIX + ":worker:{node}"
#: String whose existence means the worker is live; expires after the heartbeat TTL.
HEARTBEAT_KEY = PREFIX + ":hb:{node}"
#: Set of the nodes registered in a pool (live or not yet reaped).
POOL_WORKERS_KEY = PREFIX + ":pool:{pool}:workers"
#: Set of session ids bound to a worker; its size is the worker's load.
WORKER_SESSIONS_KEY = PREFIX + ":worker:{node}:sessions"
#: Hash of a session record. Session ids never contain ":" (``routing.validate``): no id names another's sub-key.
SESSION_KEY = PREFIX + ":session:{session_id}"
#: Set of all session ids (entries may outlive expired records until swept).
SESSIONS_KEY = PREFIX + ":sessions"
#: Hash: direct queue -> pool, for every worker queue ever registered (so dead ones get reaped).
DIRECT_QUEUES_KEY = PREFIX + ":direct-queues"
#: Hash: node -> when its last incarnation was reaped (entries are pruned after a retention period).
REAPED_KEY = PREFIX + ":reaped"
#: Short lock held by whoever moves a dead worker's queued calls.
REAP_LOCK_KEY = PREFIX + ":reap:{node}"
#: List of recipes of a session's refs, in creation order.
SESSION_RECIPES_KEY = PREFIX + ":session:{session_id}:recipes"
#: Hash: context ref id -> text, the stored copy a rehydration rebuilds a context ref from (expires with the session).
SESSION_CONTEXTS_KEY = PREFIX + ":session:{session_id}:contexts"
#: String: one big call argument sent by reference (claim-check), JSON; deleted once its call ran.
CLAIM_KEY = PREFIX + ":claim:{session_id}:{claim_id}"
#: List of messages no worker could run (malformed or refused), for an operator to inspect.
DEADLETTER_KEY = PREFIX + ":deadletter"
#: Hash of fleet-wide reliability counters (dead-lettered, answered from the store, reruns, resent, ...).
STATS_KEY = PREFIX + ":stats"
#: Message header of a call a producer sent again (same task id) after it was lost in a worker's death.
RESENT_HEADER = "flagship_resent"
#: Sorted set: task id -> when a worker ran it again (a possible duplicate execution; the newest 100,000 kept).
RERUNS_KEY = PREFIX + ":reruns"
#: Sorted set: task id -> when a producer resent it (a late original of a resent call checks it; pruned after an hour).
RESENT_KEY = PREFIX + ":resent"
#: Stream of a streamed module call's chunks (``ModuleRef.stream``), named by its task id; expires with its result.
CALL_STREAM_KEY = PREFIX + ":stream:{task_id}"
#: List of call executions recorded by the ``record`` operation (chaos tests and ``flagship bench chaos``).
EXECUTIONS_KEY = PREFIX + ":executions"


def qualify_node(name: str) -> str:
    """A worker's Celery node name: ``name@this-host`` unless ``name`` already names a host."""
    return name if "@" in name else f"{name}@{socket.gethostname()}"


def pool_queue(pool: str) -> str:
    """The pool's shared Celery queue: any worker of the pool may take from it."""
    return pool


def worker_queue(node: str) -> str:
    """A worker's own Celery queue: only that worker consumes it."""
    return f"{PREFIX}.direct.{node}"


def is_worker_queue(queue: str) -> bool:
    """Whether ``queue`` is some worker's own queue (:func:`worker_queue`)."""
    return queue.startswith(f"{PREFIX}.direct.")


def node_of_worker_queue(queue: str) -> str:
    """The node whose own queue ``queue`` is (the inverse of :func:`worker_queue`)."""
    return queue[len(f"{PREFIX}.direct."):]


#: A producer's reply channel (``flagship:results:<32 hex>``): workers also publish the results of the calls it
#: sent there (the message's ``reply_to``), so it subscribes once instead of once per call.
REPLY_CHANNEL_PREFIX = PREFIX + ":results:"
_REPLY_CHANNEL = re.compile(re.escape(REPLY_CHANNEL_PREFIX) + "[0-9a-f]{32}")


def reply_channel(token: str) -> str:
    """The reply channel named by ``token`` (32 hex digits, e.g. ``uuid4().hex``)."""
    channel = REPLY_CHANNEL_PREFIX + token
    if not _REPLY_CHANNEL.fullmatch(channel):
        raise ValueError(f"not a reply channel token: {token!r}")
    return channel


def reply_channel_or_none(value: Any) -> str | None:
    """``value`` if it is a reply channel (a message's ``reply_to``), else None: a worker publishes nowhere else."""
    return value if isinstance(value, str) and _REPLY_CHANNEL.fullmatch(value) else None


def worker_key(node: str) -> str:
    return WORKER_KEY.format(node=node)


def heartbeat_key(node: str) -> str:
    return HEARTBEAT_KEY.format(node=node)


def pool_workers_key(pool: str) -> str:
    return POOL_WORKERS_KEY.format(pool=pool)


def worker_sessions_key(node: str) -> str:
    return WORKER_SESSIONS_KEY.format(node=node)


def session_key(session_id: str) -> str:
    return SESSION_KEY.format(session_id=session_id)


def session_recipes_key(session_id: str) -> str:
    return SESSION_RECIPES_KEY.format(session_id=session_id)


def session_contexts_key(session_id: str) -> str:
    return SESSION_CONTEXTS_KEY.format(session_id=session_id)


def claim_key(session_id: str, claim_id: str) -> str:
    return CLAIM_KEY.format(session_id=session_id, claim_id=claim_id)


def reap_lock_key(node: str) -> str:
    return REAP_LOCK_KEY.format(node=node)


def call_stream(task_id: str) -> str:
    """The Redis stream a streamed call's worker writes its chunks to."""
    return CALL_STREAM_KEY.format(task_id=task_id)
