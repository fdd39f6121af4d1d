"""The pool table: data, overridable from a JSON file or inline JSON without code changes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from routing.errors import UnknownPool


class Affinity(str, Enum):
    #: Calls wait in the bound worker's direct queue.
    STRICT_QUEUE = "strict_queue"
    #: A bound worker at its in-flight limit is an immediate ``WorkerBusy``.
    STRICT_FAIL_FAST = "strict_fail_fast"
    #: The bound worker when live and free, else the shared queue; then rebind.
    HINT = "hint"

    @property
    def strict(self) -> bool:
        return self is not Affinity.HINT


class PoolKind(str, Enum):
    """What a pool's calls spend their time on; it sets the default threads per worker."""

    #: Calls wait on a model API (triage, RLM): many threads, each mostly blocked on I/O.
    LM = "lm"
    #: Calls compute in the worker (numpy analytics): few threads.
    CPU = "cpu"

    @property
    def default_concurrency(self) -> int:
        return DEFAULT_CONCURRENCY[self]


#: Threads per worker node when a pool does not name its ``concurrency`` (see docs/benchmarks.md, "LM pools").
DEFAULT_CONCURRENCY: dict[PoolKind, int] = {PoolKind.LM: 64, PoolKind.CPU: 2}


#: ``queue_timeout_s`` of a pool that names none, by affinity. Strict calls wait for one worker, so a
#: call stuck behind a long one fails after 10 s (Snakepit's default) instead of waiting forever; hint
#: calls wait for any worker of the pool (the shared queue), bounded by ``max_queued`` instead.
DEFAULT_QUEUE_TIMEOUT_S: dict[Affinity, float | None] = {
    Affinity.STRICT_QUEUE: 10.0, Affinity.STRICT_FAIL_FAST: 10.0, Affinity.HINT: None,
}
#: Calls that may wait in one worker's direct queue before the next is refused (``PoolSaturated``).
DEFAULT_MAX_QUEUED = 1000
#: ``Pool(queue_timeout_s=...)`` placeholder: the affinity's default (see ``DEFAULT_QUEUE_TIMEOUT_S``).
AFFINITY_DEFAULT = -1.0


@dataclass(frozen=True)
class Pool:
    name: str
    affinity: Affinity = Affinity.STRICT_QUEUE
    #: Workers started for the pool by ``flagship up`` and the demo.
    size: int = 2
    #: Threads per worker node (calls of different sessions run concurrently); 0: the kind's default.
    concurrency: int = 0
    #: Capabilities a worker must prove at start-up to serve the pool.
    requires: tuple[str, ...] = ()
    kind: PoolKind = PoolKind.CPU
    #: Seconds a call may wait to start (in a queue, or on its worker for its session's turn) before it
    #: fails with ``QueueTimeout`` and is never run; None (or 0): no limit. Default: the affinity's.
    queue_timeout_s: float | None = AFFINITY_DEFAULT
    #: Calls that may wait in one worker's direct queue (the shared queue: this many per live worker)
    #: before the next fails at once with ``PoolSaturated``; None (or 0): no limit.
    max_queued: int | None = DEFAULT_MAX_QUEUED
    #: The pool's own broker (a Redis or Sentinel URL); None: the default (``REDIS_URL`` or the embedded
    #: server). Its workers, queues, sessions and keys live only there (see ``routing.broker.brokers``).
    broker: str | None = None
    #: Program packages (importable module names) this pool's workers import at start, on top of
    #: ``FLAGSHIP_PROGRAMS``; producers may name programs, tools and metrics defined in them.
    programs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "affinity", Affinity(self.affinity))
        object.__setattr__(self, "kind", PoolKind(self.kind))
        if not self.concurrency:
            object.__setattr__(self, "concurrency", self.kind.default_concurrency)
        if self.size < 0 or self.concurrency < 1:
            raise ValueError(f"pool {self.name}: size must be >= 0 and concurrency >= 1")
        timeout = self.queue_timeout_s
        if timeout == AFFINITY_DEFAULT and not isinstance(timeout, bool):
            timeout = DEFAULT_QUEUE_TIMEOUT_S[self.affinity]
        object.__setattr__(self, "queue_timeout_s", _limit(self.name, "queue_timeout_s", timeout, float))
        object.__setattr__(self, "max_queued", _limit(self.name, "max_queued", self.max_queued, int))
        object.__setattr__(self, "broker", _broker(self.name, self.broker))
        object.__setattr__(self, "programs", _programs(self.name, self.programs))


def _programs(pool: str, value: Any) -> tuple[str, ...]:
    """A pool's program packages: a list of dotted module names."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v and all(part.isidentifier() for part in v.split(".")) for v in value):
        raise ValueError(f"pool {pool}: programs must be a list of importable module names (got {value!r})")
    return tuple(value)


#: URL schemes a pool's ``broker`` may use (those ``routing.broker.connect.redis_client`` knows).
BROKER_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")


def _broker(pool: str, url: Any) -> str | None:
    """A pool's broker URL, or None (null, absent or empty: the default broker)."""
    if url is None or url == "":
        return None
    if not isinstance(url, str) or not url.strip().startswith(BROKER_SCHEMES):
        raise ValueError(f"pool {pool}: broker must be a URL starting with one of {', '.join(BROKER_SCHEMES)}, "
                         f"or null for the default broker (got {url!r})")
    return url.strip()


def _limit(pool: str, key: str, value: Any, kind: type[int] | type[float]) -> Any:
    """A positive limit, or None for "no limit" (None or 0); anything else is a ``ValueError``."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if not valid or (kind is int and value != int(value)):
        raise ValueError(f"pool {pool}: {key} must be a positive {kind.__name__}, or 0/null for no limit "
                         f"(got {value!r})")
    return kind(value)


DEFAULT_POOLS: tuple[Pool, ...] = (
    Pool("triage_pool", Affinity.STRICT_QUEUE, kind=PoolKind.LM),
    # LM-bound too, but each running RLM call holds a Deno sandbox (~150 MB): fewer threads bound the memory.
    Pool("rlm_pool", Affinity.STRICT_QUEUE, requires=("deno",), kind=PoolKind.LM, concurrency=8),
    Pool("analytics_pool", Affinity.HINT, kind=PoolKind.CPU),
)


def _pool_from_mapping(name: str, data: Mapping[str, Any], base: Pool | None) -> Pool:
    pool = base or Pool(name)
    changes: dict[str, Any] = {}
    if "affinity" in data:
        changes["affinity"] = Affinity(data["affinity"])
    for key in ("size", "concurrency"):
        if key in data:
            changes[key] = int(data[key])
    if changes.get("concurrency", 1) < 1:
        raise ValueError(f"pool {name}: concurrency must be >= 1 (leave it out for the kind's default)")
    if "requires" in data:
        changes["requires"] = tuple(data["requires"])
    if "queue_timeout_s" in data:
        changes["queue_timeout_s"] = _limit(name, "queue_timeout_s", data["queue_timeout_s"], float)
    elif "affinity" in data:  # a new affinity brings its own default
        changes["queue_timeout_s"] = AFFINITY_DEFAULT
    if "max_queued" in data:
        changes["max_queued"] = _limit(name, "max_queued", data["max_queued"], int)
    if "broker" in data:
        changes["broker"] = _broker(name, data["broker"])
    if "programs" in data:
        changes["programs"] = _programs(name, data["programs"] or [])
    if "kind" in data:
        changes["kind"] = PoolKind(data["kind"])
        if "concurrency" not in data:  # a new kind brings its own default
            changes["concurrency"] = changes["kind"].default_concurrency
    return replace(pool, **changes)


@dataclass(frozen=True)
class PoolTable:
    pools: Mapping[str, Pool] = field(default_factory=lambda: {p.name: p for p in DEFAULT_POOLS})

    def get(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise UnknownPool(name, sorted(self.pools)) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.pools.values())

    def __contains__(self, name: object) -> bool:
        return name in self.pools

    def to_json(self) -> str:
        """The whole table in the form ``load`` reads (to hand it to child processes)."""
        return json.dumps({
            p.name: {"affinity": p.affinity.value, "kind": p.kind.value, "size": p.size,
                     "concurrency": p.concurrency, "requires": list(p.requires),
                     "queue_timeout_s": p.queue_timeout_s, "max_queued": p.max_queued,
                     **({"broker": p.broker} if p.broker else {}),
                     **({"programs": list(p.programs)} if p.programs else {})}
            for p in self.pools.values()
        })

    def with_pool(self, pool: Pool) -> PoolTable:
        return PoolTable({**self.pools, pool.name: pool})

    @classmethod
    def load(cls, config: str | None) -> PoolTable:
        """Defaults, updated by ``config``: a path to a JSON file or a JSON string.

        The JSON maps pool names to fields (``affinity``, ``kind``, ``size``,
        ``concurrency``, ``requires``, ``queue_timeout_s``, ``max_queued``, ``broker``, ``programs``); unknown
        names add pools, ``null`` removes one. A pool without ``concurrency`` gets its
        kind's default (``lm``: 64 threads, ``cpu``: 2); a new pool's kind defaults to
        ``cpu``. Without ``queue_timeout_s`` a pool gets its affinity's default (10 s
        for the strict ones, none for ``hint``); ``max_queued`` defaults to 1,000 per
        worker; ``null`` or 0 turns either limit off. ``broker`` (a Redis or Sentinel
        URL) puts the pool on its own server; ``null`` or absent: the default one.
        ``programs`` lists program packages its workers import at start (with ``FLAGSHIP_PROGRAMS``).
        """
        pools = {p.name: p for p in DEFAULT_POOLS}
        if not config:
            return cls(pools)
        text = config if config.lstrip().startswith("{") else Path(config).read_text()
        for name, data in json.loads(text).items():
            if data is None:
                pools.pop(name, None)
            else:
                pools[name] = _pool_from_mapping(name, data, pools.get(name))
        return cls(pools)
