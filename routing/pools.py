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

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PoolKind(self.kind))
        if not self.concurrency:
            object.__setattr__(self, "concurrency", self.kind.default_concurrency)
        if self.size < 0 or self.concurrency < 1:
            raise ValueError(f"pool {self.name}: size must be >= 0 and concurrency >= 1")


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
                     "concurrency": p.concurrency, "requires": list(p.requires)}
            for p in self.pools.values()
        })

    def with_pool(self, pool: Pool) -> PoolTable:
        return PoolTable({**self.pools, pool.name: pool})

    @classmethod
    def load(cls, config: str | None) -> PoolTable:
        """Defaults, updated by ``config``: a path to a JSON file or a JSON string.

        The JSON maps pool names to fields (``affinity``, ``kind``, ``size``,
        ``concurrency``, ``requires``); unknown names add pools, ``null`` removes one.
        A pool without ``concurrency`` gets its kind's default (``lm``: 64 threads,
        ``cpu``: 2); a new pool's kind defaults to ``cpu``.
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
