"""The fleet LM cache: a Redis tier under DSPy's in-memory tier, one cache for every worker of the broker.

DSPy's ``dspy.cache`` (``dspy.clients.cache.Cache``) has two tiers, memory then
disk, and keys every request with its own hash (model, messages, every parameter;
the API key and base left out). With ``FLAGSHIP_LM_CACHE=fleet`` a worker keeps
DSPy's memory tier (bounded, entries live at most the TTL) and replaces the disk
tier with :class:`FleetTier`, so a request answered once by any worker is a hit
for all of them, and for workers started later.

- **Single-flight.** A lookup that misses takes the request's flight lock (a
  Redis key with a lease) and the call goes to the provider; concurrent identical
  lookups register as waiters and block on the flight's own wake-up list. Storing
  the answer (or giving up on it, when the call failed) ends the flight: the lock
  goes and each waiter gets a wake-up and looks again (a hit, or it leads the next
  try). A waiter never waits past its call's deadline or the lock's lease (a killed
  leader's lock runs out), then goes to the provider itself.
- **TTL and size cap, kept by the cache itself.** Every entry has the TTL; a sorted
  set of access times and a hash of entry sizes let the store script evict the
  least recently used entries past ``FLAGSHIP_LM_CACHE_MAX_MB``. Only keys this cache
  wrote are ever evicted: the broker's queues and session keys are never touched
  (Redis ``maxmemory`` eviction is not relied on, and must stay ``noeviction`` on a broker).
- **JSON only.** DSPy's native records (``CallResult.dump()``, plain data) are stored
  when they load back and hold an output; anything else (LiteLLM SDK objects) stays
  in the worker's memory tier only.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from routing.broker.scripts import source

__all__ = ["FleetTier", "Flight", "flight_var", "install_fleet_cache", "PREFIX"]

log = logging.getLogger(__name__)

PREFIX = "flagship:lmcache:"
LRU_KEY = PREFIX + "lru"
SIZES_KEY = PREFIX + "sizes"
BYTES_KEY = PREFIX + "bytes"
#: Bytes an entry costs beyond its value (its key in three structures, bookkeeping).
entry_overhead_bytes = 200


@dataclass
class Flight:
    """The flights one LM request leads (value key -> token), and how long it may wait on others'."""

    deadline: float | None = None  # time.monotonic()
    held: dict[str, str] = field(default_factory=dict)
    waited: bool = False


#: The current LM request's flights (set by the governor around each request).
flight_var: ContextVar[Flight | None] = ContextVar("flagship_lm_flight", default=None)


class FleetTier:
    """What ``dspy.cache`` asks of its disk tier (``get``/``set``/``delete``/``in``), on Redis."""

    def __init__(self, redis: Redis, ttl_s: float, max_bytes: int, lease_s: float) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self.max_bytes = max_bytes
        self.lease_ms = int(lease_s * 1000)
        self._lookup = redis.register_script(source("lm_cache_lookup"))
        self._store = redis.register_script(source("lm_cache_store"))

    @staticmethod
    def keys(key: str) -> list[str]:
        return [f"{PREFIX}v:{key}", f"{PREFIX}lock:{key}", LRU_KEY, SIZES_KEY, BYTES_KEY]

    def get(self, key: str, default: Any = None) -> Any:
        flight = flight_var.get()
        token = uuid.uuid4().hex if flight is not None else ""
        keys = self.keys(key)
        for _ in range(1000):
            try:
                reply = self._lookup(keys, [token, self.lease_ms])
            except RedisError as exc:
                log.warning("fleet LM cache unreachable (%s): calling the provider", exc)
                return default
            kind = reply[0]
            if kind == "hit":
                return self._decode(reply[1], default)
            if kind == "lead":
                assert flight is not None
                flight.held[key] = token
                return default
            if kind == "miss" and not token:
                return default
            if kind == "wait" and not self._wait(flight, keys[1], reply[1], int(reply[2])):
                return default
        return default

    def _wait(self, flight: Flight | None, lock: str, holder: str, lease_left_ms: int) -> bool:
        """Block until the leader's flight ends (True), or give up at the deadline (False)."""
        assert flight is not None
        left = 60.0 if flight.deadline is None else flight.deadline - time.monotonic()
        if left <= 0:
            return False
        flight.waited = True
        timeout = max(0.01, min(left, lease_left_ms / 1000 + 0.05, 1.0))
        try:
            self.redis.blpop([f"{lock}:n:{holder}"], timeout=timeout)
        except RedisError as exc:
            log.warning("fleet LM cache: waiting for an identical request failed (%s)", exc)
            return False
        return True

    def _decode(self, text: str, default: Any) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return default

    @staticmethod
    def storable(value: Any) -> str | None:
        """``value`` as JSON when it is DSPy's plain-data record of a successful, loadable response."""
        from dspy.clients.call_result import CACHE_FORMAT, CallResult

        if not isinstance(value, dict) or value.get("_dspy_format") != CACHE_FORMAT or not value.get("outputs"):
            return None
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
            CallResult.load(json.loads(text))
        except Exception:  # not JSON, or does not load back: the memory tier keeps it
            return None
        return text

    def set(self, key: str, value: Any, *args: Any, **kwargs: Any) -> bool:
        flight = flight_var.get()
        token = flight.held.pop(key, "") if flight is not None else ""
        text = self.storable(value)
        size = 0 if text is None else len(text) + entry_overhead_bytes
        if size > self.max_bytes:
            text = None
        self._write(key, text or "", token, size)
        return text is not None

    def end_flights(self, flight: Flight) -> None:
        """The request failed (or stored nothing): wake its waiters so one of them tries."""
        while flight.held:
            key, token = flight.held.popitem()
            self._write(key, "", token, 0)

    def _write(self, key: str, text: str, token: str, size: int) -> None:
        if not text and not token:
            return
        try:
            self._store(self.keys(key), [text, self.ttl_ms, self.max_bytes, token, size])
        except RedisError as exc:
            log.warning("fleet LM cache: could not store a response (%s)", exc)

    def delete(self, key: str) -> bool:
        try:
            return bool(self.redis.delete(f"{PREFIX}v:{key}"))
        except RedisError:
            return False

    def __contains__(self, key: str) -> bool:
        try:
            return bool(self.redis.exists(f"{PREFIX}v:{key}"))
        except RedisError:
            return False


def install_fleet_cache(redis: Redis, ttl_s: float, max_bytes: int, memory_entries: int,
                        lease_s: float) -> FleetTier:
    """Make this process's ``dspy.cache`` a memory tier (TTL-bounded) over the fleet tier."""
    import dspy
    from cachetools import TTLCache

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True, memory_max_entries=memory_entries)
    tier = FleetTier(redis, ttl_s, max_bytes, lease_s)
    cache = dspy.cache
    cache.memory_cache = TTLCache(maxsize=memory_entries, ttl=ttl_s)
    cache.disk_cache = tier
    cache.enable_disk_cache = True
    return tier
