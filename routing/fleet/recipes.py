"""How a ref is rebuilt: one recipe format, written by workers, read by producers when they rehydrate.

A session's recipes live in one Redis hash (ref id -> JSON ``{"seq", "op",
"kwargs"}``) that expires with the session. Secrets are never written: an
``api_key`` passed to ``lm`` is dropped (a rebuilt LM uses the worker's
configured key), and the same names are masked wherever a call is shown.
With Sentinel a recipe write waits for a replica (``routing.broker.connect.execute_replicated``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis

from routing import names
from routing.broker.connect import execute_replicated

#: Argument names whose values are never stored in a recipe nor shown in task events, Flower or logs.
SECRET_ARGUMENTS = frozenset({"api_key"})


@dataclass(frozen=True)
class Recipe:
    ref_id: str
    #: The operation that built the ref, and its arguments (secrets removed).
    op: str
    kwargs: dict[str, Any]
    #: Creation order within the session (a rebuild replays in this order).
    seq: int


def masked(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every secret value replaced by ``***``."""
    return {k: "***" if k in SECRET_ARGUMENTS else v for k, v in kwargs.items()}


def record(redis: Redis, session_id: str, ref_id: str, op: str, kwargs: dict[str, Any], ttl_s: float) -> None:
    """Write (or rewrite, keeping its place in the order) the recipe of ``ref_id``."""
    key = names.session_recipes_key(session_id)
    safe = {k: v for k, v in kwargs.items() if k not in SECRET_ARGUMENTS and k != "ref_id"}
    existing = redis.hget(key, ref_id)
    seq = json.loads(existing)["seq"] if existing else time.time_ns()
    pipe = redis.pipeline(transaction=False)  # with Sentinel, WAIT for a replica covers both writes
    pipe.hset(key, ref_id, json.dumps({"seq": seq, "op": op, "kwargs": safe}))
    pipe.pexpire(key, int(ttl_s * 1000))
    execute_replicated(redis, pipe)


def forget(redis: Redis, session_id: str, ref_id: str) -> None:
    redis.hdel(names.session_recipes_key(session_id), ref_id)


def read(redis: Redis, session_id: str) -> list[Recipe]:
    """Every recorded recipe of the session, in creation order."""
    raw = redis.hgetall(names.session_recipes_key(session_id))
    recipes = []
    for ref_id, value in raw.items():
        data = json.loads(value)
        recipes.append(Recipe(ref_id, data["op"], data["kwargs"], int(data["seq"])))
    return sorted(recipes, key=lambda r: r.seq)
