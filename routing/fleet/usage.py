"""The LM usage ledger as producers read it: counters per session, per run and per pool and model, and budgets.

Workers add to these hashes after every LM call (``tasks.lm.ledger``); producers
read them (``session.usage()``, ``client.usage()``, ``MapResult.usage``) and write
the budgets a session or a run may spend (checked by workers before each
provider request, ``routing/broker/scripts/lm_gate.lua``).

Keys (one Redis, the pool's broker):

- ``flagship:usage:session:<id>``: ``calls``, ``prompt_tokens``, ``completion_tokens``,
  ``cost_usd``, ``cache_hits``; ``budget_tokens`` / ``budget_usd`` when set; ``run``
  when the session belongs to a ``client.map`` / ``client.evaluate`` run. Expires
  ``usage_ttl_s`` after its last write.
- ``flagship:usage:run:<id>``: the same counters and budgets for a whole run.
- ``flagship:usage:pool:<pool>:<model>``: the same counters, plus ``limit_wait_s`` /
  ``limit_waits`` (time calls waited for fleet capacity); listed in ``flagship:usage:index``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from redis import Redis

from routing import validate

__all__ = ["USAGE_FIELDS", "session_key", "run_key", "pool_key", "INDEX_KEY", "totals", "session_usage",
           "run_usage", "set_budget", "join_run", "start_run", "pool_usage", "pool_rows", "check_budget", "added"]

#: What every usage reading holds, exactly.
USAGE_FIELDS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd", "cache_hits")
#: Usage of a session or run is kept this long after its last LM call (a week).
usage_ttl_s = 7 * 24 * 3600
INDEX_KEY = "flagship:usage:index"


def session_key(session_id: str) -> str:
    return f"flagship:usage:session:{session_id}"


def run_key(run_id: str) -> str:
    return f"flagship:usage:run:{run_id}"


def pool_key(pool: str, model: str) -> str:
    return f"flagship:usage:pool:{pool}:{model}"


def _number(raw: Any) -> float:
    try:
        return float(raw or 0)
    except (TypeError, ValueError):
        return 0.0


def totals(raw: dict[str, Any]) -> dict[str, Any]:
    """A hash's counters as ``{"calls", "prompt_tokens", "completion_tokens", "cost_usd", "cache_hits"}``."""
    found = {name: int(_number(raw.get(name))) for name in USAGE_FIELDS if name != "cost_usd"}
    return {**found, "cost_usd": round(_number(raw.get("cost_usd")), 9)}


def _with_budget(raw: dict[str, Any]) -> dict[str, Any]:
    used = totals(raw)
    budget_tokens, budget_usd = raw.get("budget_tokens"), raw.get("budget_usd")
    return {**used,
            "budget": {"tokens": None if budget_tokens is None else int(_number(budget_tokens)),
                       "usd": None if budget_usd is None else _number(budget_usd)},
            "spent": {"tokens": used["prompt_tokens"] + used["completion_tokens"], "usd": used["cost_usd"]}}


def session_usage(redis: Redis, session_id: str) -> dict[str, Any]:
    """A session's usage, its budget (None: unlimited) and what it spent against it."""
    return _with_budget(redis.hgetall(session_key(session_id)))


def run_usage(redis: Redis, run_id: str) -> dict[str, Any]:
    return totals(redis.hgetall(run_key(run_id)))


def check_budget(op: str, budget_tokens: Any, budget_usd: Any) -> tuple[int | None, float | None]:
    """Budgets as given to ``client.session`` / ``map`` / ``evaluate``: positive numbers or None."""
    validate.number(op, "budget_tokens", budget_tokens, 1, 10**15, integer=True)
    validate.number(op, "budget_usd", budget_usd, 1e-9, 1e12)
    return (None if budget_tokens is None else int(budget_tokens),
            None if budget_usd is None else float(budget_usd))


def set_budget(redis: Redis, key: str, budget_tokens: int | None, budget_usd: float | None) -> None:
    """Record what ``key``'s session or run may spend (nothing when neither is set)."""
    fields = {name: value for name, value in (("budget_tokens", budget_tokens), ("budget_usd", budget_usd))
              if value is not None}
    if fields:
        pipe = redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, usage_ttl_s)
        pipe.execute()


def join_run(redis: Redis, session_id: str, run_id: str) -> None:
    """The session's LM calls count (and are budgeted) as part of run ``run_id`` too."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(session_key(session_id), "run", run_id)
    pipe.expire(session_key(session_id), usage_ttl_s)
    pipe.execute()


def start_run(redis: Redis, budget_tokens: int | None, budget_usd: float | None) -> str:
    """A new run id (``client.map``/``evaluate``), its budget recorded; its sessions join it (:func:`join_run`)."""
    run_id = uuid.uuid4().hex
    set_budget(redis, run_key(run_id), budget_tokens, budget_usd)
    return run_id


def added(readings: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Usage readings (of several brokers) added up."""
    summed = dict.fromkeys(USAGE_FIELDS, 0.0)
    for reading in readings:
        for name in USAGE_FIELDS:
            summed[name] += reading.get(name, 0)
    return totals(summed)


def pool_rows(redis: Redis) -> list[tuple[str, str, dict[str, Any]]]:
    """``(pool, model, raw counters)`` for every pool and model that made an LM call on this broker."""
    pairs = sorted(tuple(json.loads(member)) for member in redis.smembers(INDEX_KEY))
    pipe = redis.pipeline(transaction=False)
    for pool, model in pairs:
        pipe.hgetall(pool_key(pool, model))
    return [(pool, model, raw) for (pool, model), raw in zip(pairs, pipe.execute())]


def pool_usage(redis: Redis, pool: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The counters of every (pool, model) matching ``pool`` and ``model`` (None: any), added up."""
    return added(totals(raw) for row_pool, row_model, raw in pool_rows(redis)
                 if pool in (None, row_pool) and model in (None, row_model))
