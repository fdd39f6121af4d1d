"""The usage ledger's writes: every LM call's tokens, cost and cache hit, per session, run, pool and model.

One pipelined write per call (``routing.fleet.usage`` names the hashes), which also
settles the call's limiter reservation. A provider call waits for its write (so the budget
check of the session's next call sees it), but calls finishing while a write is on its way
share the next one: on a busy worker one round trip carries many calls. A cache hit (no
tokens, nothing to settle) made inside a call does not wait: it rides with the next write, at
the latest the one its call makes when it ends (:meth:`Ledger.flush`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from routing.fleet import usage

__all__ = ["Ledger", "Entry"]

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One LM call as the ledger counts it."""

    pool: str
    model: str
    session_id: str | None = None
    run_id: str | None = None
    calls: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    waited_s: float = 0.0
    #: The limiter's settle script call, ``(keys, args)``, written in the same pipeline.
    settle: tuple[list[str], list[Any]] | None = None


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0


def from_usage(entry: Entry, found: dict[str, Any] | None, cost: Any) -> Entry:
    found = found or {}
    entry.prompt_tokens = _int(found.get("prompt_tokens"))
    entry.completion_tokens = _int(found.get("completion_tokens"))
    entry.cost_usd = float(cost) if isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0 else 0.0
    return entry


class Ledger:
    def __init__(self, redis: Redis, settle_script: Callable[..., Any]) -> None:
        self.redis, self.settle_script = redis, settle_script
        self._cond = threading.Condition()
        self._pending: list[tuple[Entry, threading.Event]] = []
        self._writing = False

    def record(self, entry: Entry, wait: bool = True) -> None:
        """Add ``entry``: returns once it is written (alone or with others'), or at once when not ``wait``
        (then a later write, or :meth:`flush`, takes it)."""
        done = threading.Event()
        with self._cond:
            self._pending.append((entry, done))
            if not wait:
                return
            while self._writing and not done.is_set():
                self._cond.wait()
            if done.is_set():
                return
            batch, self._pending, self._writing = self._pending, [], True
        self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[Entry, threading.Event]]) -> None:
        try:
            self._write([e for e, _ in batch])
        finally:
            with self._cond:
                self._writing = False
                for _, event in batch:
                    event.set()
                self._cond.notify_all()

    def flush(self) -> None:
        """Write what waits (cache hits) now, unless a provider call's write took it along (no round trip then)."""
        with self._cond:
            while self._writing:
                self._cond.wait()
            if not self._pending:
                return
            batch, self._pending, self._writing = self._pending, [], True
        self._write_batch(batch)

    def _write(self, entries: list[Entry]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            if entry.calls:
                self._add(pipe, usage.pool_key(entry.pool, entry.model), entry, None)
                pipe.sadd(usage.INDEX_KEY, json.dumps([entry.pool, entry.model]))
                if entry.session_id:
                    self._add(pipe, usage.session_key(entry.session_id), entry, usage.usage_ttl_s)
                if entry.run_id:
                    self._add(pipe, usage.run_key(entry.run_id), entry, usage.usage_ttl_s)
            if entry.waited_s > 0:
                key = usage.pool_key(entry.pool, entry.model)
                pipe.hincrbyfloat(key, "limit_wait_s", round(entry.waited_s, 6))
                pipe.hincrby(key, "limit_waits", 1)
            if entry.settle is not None:
                keys, args = entry.settle
                self.settle_script(keys, args, client=pipe)
        try:
            pipe.execute()
        except RedisError as exc:  # a completed call is never failed by its accounting
            log.warning("LM usage of %d call(s) not recorded: %s", len(entries), exc)

    @staticmethod
    def _add(pipe: Any, key: str, entry: Entry, ttl_s: float | None) -> None:
        pipe.hincrby(key, "calls", entry.calls)
        for name in ("prompt_tokens", "completion_tokens", "cache_hits"):
            if getattr(entry, name):
                pipe.hincrby(key, name, getattr(entry, name))
        if entry.cost_usd:
            pipe.hincrbyfloat(key, "cost_usd", entry.cost_usd)
        if ttl_s is not None:
            pipe.expire(key, int(ttl_s))
