"""The one path every LM request of a worker takes: fleet cache → fleet limits → provider → usage ledger.

DSPy 3.4.1 runs every LM call, of any ``dspy.LM`` (the session's ``ProviderLM``s and
LMs a user's program built itself), through ``dspy.clients.execution.execute`` /
``aexecute``; :func:`install` wraps both (pinned in ``tests/test_upstream_seams.py``):

1. **cache** (``FLAGSHIP_LM_CACHE`` ``fleet`` or ``local``): DSPy's own lookup
   (``execution._cached``: its request key, its memory tier, then the fleet tier of
   ``tasks.lm.fleet_cache`` with single-flight). A hit costs nothing: its history entry
   says ``cache_hit`` with cost 0, and it counts as a call and a cache hit. LMs with
   ``cache=False`` and requests with a ``rollout_id`` are never cached.
2. **limits** (``tasks.lm.limiter``): the model's 429 pause, the session's and run's
   budgets (``BudgetExceeded``), ``rpm``/``tpm``/``concurrency`` (waits, or ``RateLimited``).
3. **provider**: DSPy's own execution, uncached (the answer is stored by step 1's cache
   afterwards). A 429 pauses the model for every worker until its ``Retry-After``
   (else the LM's first backoff), then the call's retry goes through step 2 again.
4. **ledger** (``tasks.lm.ledger``): tokens, cost, cache hits per session, run, pool and
   model, in the same write as the limiter's settlement.

A call's scope (session, deadline) is set by the worker around each call
(:func:`lm_scope`) in DSPy's settings, so DSPy's own threads (``dspy.Parallel``,
``asyncify``) carry it. The offline scripted LM is counted too (its scripted tokens, cost 0); it is
never cached, and no limit names it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import dspy
from cachetools import LRUCache
from redis import Redis

from routing.broker.connect import redis_client
from routing.errors import CallCancelled
from routing.fleet import usage
from tasks.lm.fleet_cache import FleetTier, Flight, flight_var, install_fleet_cache
from tasks.lm.governance import GovernorSettings
from tasks.lm.ledger import Entry, Ledger, from_usage
from tasks.lm.limiter import Admission, Limiter
from tasks.tracing.dspy_spans import lm_attributes

__all__ = ["Governor", "Scope", "install", "current", "lm_scope", "SCOPE_KEY"]

#: The DSPy setting that carries a call's :class:`Scope`.
SCOPE_KEY = "flagship_lm_scope"

_lock = threading.Lock()
_governor: Governor | None = None
_original: tuple[Any, Any] | None = None  # DSPy's execute, aexecute


@dataclass(frozen=True)
class Scope:
    session_id: str | None
    #: Epoch seconds by which the call must be done waiting (the route's ``deadline``; None: the default wait).
    deadline: float | None = None


#: Set around a module run its producer may cancel mid-way (a stream's ``close()``): once the event is set, the
#: run's next LM request raises ``CallCancelled`` instead of going out (the one in flight finishes).
stop_requests: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("flagship_stop", default=None)


@contextmanager
def lm_scope(session_id: str | None, deadline: float | None = None) -> Iterator[None]:
    """LM requests made inside count for ``session_id`` and wait for capacity at most until ``deadline``."""
    if _governor is None:
        yield
        return
    try:
        with dspy.context(**{SCOPE_KEY: Scope(session_id, deadline)}):
            yield
    finally:
        _governor.ledger.flush()  # its cache hits are counted before its result is


def current() -> Governor | None:
    return _governor


def _rollout(call: Any) -> bool:
    return call.kwargs.get("rollout_id") is not None or call.legacy.get("rollout_id") is not None


def _status(exc: BaseException) -> Any:
    return getattr(exc, "status", None) or getattr(exc, "status_code", None)


def rate_limited(exc: BaseException) -> bool:
    """A provider's 429 (DSPy's ``LMRateLimitError``, LiteLLM's ``RateLimitError``)."""
    from dspy.utils.exceptions import LMRateLimitError

    return isinstance(exc, LMRateLimitError) or _status(exc) == 429 or type(exc).__name__ == "RateLimitError"


def estimate_tokens(lm: Any, call: Any) -> int:
    """What a request may cost before the provider says: prompt characters / 4, plus ``max_tokens``."""
    messages = call.legacy.get("messages") if call.request is None else None
    if messages:
        chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content")))
                    for m in messages if isinstance(m, dict))
    else:
        chars = len(str(call.request if call.request is not None else call.prompt or ""))
    out = call.legacy.get("max_tokens") or call.legacy.get("max_completion_tokens")
    if call.request is not None:
        out = getattr(getattr(call.request, "config", None), "max_tokens", None)
    return chars // 4 + 1 + (int(out) if isinstance(out, int) else 0)


class Governor:
    """One worker's LM governance: its cache tier, limiter and ledger, for pool ``pool``."""

    def __init__(self, redis: Redis, pool: str, settings: GovernorSettings, timeout_s: float) -> None:
        from dspy.clients import execution

        self.execution = execution
        self.pool, self.settings, self.redis = pool, settings, redis
        self.lease_s = timeout_s + 10.0
        self.cache_on = settings.cache != "off"
        self.cache_redis: Redis | None = None
        self.tier: FleetTier | None = None
        if settings.cache == "fleet":
            self.cache_redis = redis_client(settings.cache_url, decode_responses=True) if settings.cache_url else redis
            self.tier = install_fleet_cache(self.cache_redis, settings.cache_ttl_s, settings.cache_max_bytes,
                                            settings.cache_memory_entries, self.lease_s)
        self.limiter = Limiter(redis, settings, timeout_s)
        self.ledger = Ledger(redis, self.limiter.settle_script)
        self._runs: LRUCache[str, str | None] = LRUCache(maxsize=100_000)
        self._runs_lock = threading.Lock()

    def governs(self, lm: Any, call: Any) -> bool:
        return bool(getattr(call, "managed", False))

    def run_of(self, session_id: str | None) -> str | None:
        """The ``client.map``/``evaluate`` run a session belongs to (read once per session)."""
        if session_id is None:
            return None
        with self._runs_lock:
            if session_id in self._runs:
                return self._runs[session_id]
        run = self.redis.hget(usage.session_key(session_id), "run")
        with self._runs_lock:
            self._runs[session_id] = run
        return run  # type: ignore[no-any-return]

    def _flight(self, scope: Scope | None) -> Flight:
        wait_s = self.lease_s if scope is None or scope.deadline is None else scope.deadline - time.time()
        return Flight(deadline=time.monotonic() + min(wait_s, self.lease_s))

    def _entry(self, lm: Any, scope: Scope | None, **counts: Any) -> Entry:
        session_id = None if scope is None else scope.session_id
        return Entry(self.pool, str(lm.model), session_id, self.run_of(session_id), **counts)

    def _before(self, lm: Any, call: Any, scope: Scope | None, asynchronous: bool) -> tuple[Any, Any, Any]:
        """``(cached result, None, call)`` on a hit, else ``(None, admission, uncached call)`` once admitted."""
        if (stop := stop_requests.get()) is not None and stop.is_set():
            raise CallCancelled(None if scope is None else scope.session_id, "call")
        cacheable = self.cache_on and call.cache and not _rollout(call)
        if cacheable:
            hit = self.execution._cached(lm, call, asynchronous)
            if hit is not None:
                hit.cost = 0.0
                hit.cost_details = {"kind": "cache_hit", "reason": "answered by the LM cache; no provider request"}
                # inside a call, the count rides with the next write (the call's own at its end, lm_scope)
                self.ledger.record(self._entry(lm, scope, cache_hits=1), wait=scope is None)
                lm_attributes({"cache_hit": True, "usage.cost_usd": 0.0})
                return hit, None, call
        session_id = None if scope is None else scope.session_id
        admission = self.limiter.admit(str(lm.model), session_id, self.run_of(session_id),
                                       None if scope is None else scope.deadline, estimate_tokens(lm, call))
        return None, admission, replace(call, cache=False) if call.cache else call

    def _failed(self, lm: Any, scope: Scope | None, admission: Admission, exc: BaseException) -> None:
        if rate_limited(exc):
            from dspy.clients._http import finite_seconds

            hint = finite_seconds(getattr(exc, "retry_after", None))
            self.limiter.pause(str(lm.model), hint if hint is not None else float(getattr(lm, "backoff_s", 1.0)))
        entry = self._entry(lm, scope, calls=0, waited_s=admission.waited_s)
        lm_attributes({"cache_hit": False, "rate_limit.wait_s": admission.waited_s})
        entry.settle = admission.settle_args(0)
        if entry.waited_s or entry.settle:
            self.ledger.record(entry)

    def _done(self, lm: Any, call: Any, scope: Scope | None, admission: Admission, result: Any,
              asynchronous: bool) -> None:
        if self.cache_on and call.cache and not _rollout(call):
            self.execution._store(lm, call, result, asynchronous)  # waiters of its flight wake now
        entry = from_usage(self._entry(lm, scope, waited_s=admission.waited_s), result.usage, result.cost)
        used = entry.prompt_tokens + entry.completion_tokens
        entry.settle = admission.settle_args(used if used else estimate_tokens(lm, call))
        lm_attributes({"cache_hit": False, "usage.input_tokens": entry.prompt_tokens, "usage.cost_usd": entry.cost_usd,
                       "usage.output_tokens": entry.completion_tokens, "rate_limit.wait_s": entry.waited_s})
        self.ledger.record(entry)

    def _end_flights(self, flight: Flight) -> None:
        if flight.held and self.tier is not None:
            self.tier.end_flights(flight)

    def execute(self, lm: Any, call: Any) -> Any:
        assert _original is not None
        scope = dspy.settings.get(SCOPE_KEY)
        flight = self._flight(scope)
        token = flight_var.set(flight)
        try:
            hit, admission, sent = self._before(lm, call, scope, False)
            if hit is not None:
                return hit
            try:
                result = _original[0](lm, sent)
            except BaseException as exc:
                self._failed(lm, scope, admission, exc)
                raise
            self._done(lm, call, scope, admission, result, False)
            return result
        finally:
            flight_var.reset(token)
            self._end_flights(flight)

    async def aexecute(self, lm: Any, call: Any) -> Any:
        assert _original is not None
        scope = dspy.settings.get(SCOPE_KEY)
        flight = self._flight(scope)
        token = flight_var.set(flight)  # asyncio.to_thread copies the context: the flight object is shared
        try:
            hit, admission, sent = await asyncio.to_thread(self._before, lm, call, scope, True)
            if hit is not None:
                return hit
            try:
                result = await _original[1](lm, sent)
            except BaseException as exc:
                await asyncio.to_thread(self._failed, lm, scope, admission, exc)
                raise
            await asyncio.to_thread(self._done, lm, call, scope, admission, result, True)
            return result
        finally:
            flight_var.reset(token)
            if flight.held:
                await asyncio.to_thread(self._end_flights, flight)

    def shutdown(self) -> None:
        if self.cache_redis is not None and self.cache_redis is not self.redis:
            self.cache_redis.close()


def governed_execute(lm: Any, call: Any) -> Any:
    governor = _governor
    if governor is None or not governor.governs(lm, call):
        assert _original is not None
        return _original[0](lm, call)
    return governor.execute(lm, call)


async def governed_aexecute(lm: Any, call: Any) -> Any:
    governor = _governor
    if governor is None or not governor.governs(lm, call):
        assert _original is not None
        return await _original[1](lm, call)
    return await governor.aexecute(lm, call)


def install(redis: Redis, pool: str, settings: GovernorSettings, timeout_s: float) -> Governor:
    """Govern this process's LM requests (a worker, at start): returns the governor (a worker service)."""
    global _governor, _original
    from dspy.clients import execution

    governor = Governor(redis, pool, settings, timeout_s)
    with _lock:
        if _original is None:
            # wraps DSPy 3.4.1 dspy.clients.execution.execute/aexecute; pinned in tests/test_upstream_seams.py
            _original = (execution.execute, execution.aexecute)
            execution.execute = governed_execute
            execution.aexecute = governed_aexecute
        _governor = governor
    return governor
