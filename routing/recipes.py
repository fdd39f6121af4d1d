"""Creation recipes of a session's refs, kept in Redis so a new worker can rebuild them.

Secrets are never written: an ``api_key`` passed to ``lm`` is dropped from the
recipe (a rebuilt LM uses the worker's configured key).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

from routing import names

#: Recipe arguments never stored.
SECRET_ARGUMENTS = frozenset({"api_key"})


def record(redis: Redis, session_id: str, ref_id: str, op: str, kwargs: dict[str, Any], ttl_s: float) -> None:
    key = names.session_recipes_key(session_id)
    safe = {k: v for k, v in kwargs.items() if k not in SECRET_ARGUMENTS and k != "ref_id"}
    existing = redis.hget(key, ref_id)
    seq = json.loads(existing)["seq"] if existing else time.time_ns()
    pipe = redis.pipeline()
    pipe.hset(key, ref_id, json.dumps({"seq": seq, "op": op, "kwargs": safe}))
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.execute()


def forget(redis: Redis, session_id: str, ref_id: str) -> None:
    redis.hdel(names.session_recipes_key(session_id), ref_id)
