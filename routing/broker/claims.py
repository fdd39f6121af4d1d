"""Claim-check: big call arguments travel as Redis keys, not inside the task message.

A top-level keyword argument whose JSON is at least the threshold (64 KB by
default, ``FLAGSHIP_CLAIM_THRESHOLD_BYTES``; 0 turns this off) is written once
to its own key, ``flagship:claim:<session id>:<claim id>``, with a TTL of the
session's TTL (at least an hour). The message keeps the other arguments and
names the claims in its route (``route["claims"] = {argument: claim id}``).
The worker reads a call's claims with one ``MGET`` inside the call's turn and
deletes them once the call finished, successfully or with an error; a worker
killed mid-call deletes nothing, so the redelivered call still finds them.

Only strings, lists and dicts can be big, and only they are measured: a string
by its length (a non-ASCII one below the threshold by its JSON), a list or dict
by walking it until the threshold is passed. Small calls pay microseconds.
A string is stored as itself; anything else with kombu's JSON, exactly as in a message.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kombu.utils import json as kombu_json
from redis import Redis
from redis.exceptions import RedisError

from routing import names
from routing.errors import InvalidArgument
from routing.validate import json_size

log = logging.getLogger(__name__)

#: Arguments at least this big (bytes of JSON) are sent by reference unless configured otherwise.
default_threshold_bytes = 64 * 1024
#: A claim outlives its session's TTL, and at least this long (a call may wait that long in a queue).
min_ttl_s = 3600.0

#: kombu's JSON (as in a message: its ``__json__`` hook, its type markers); untyped upstream.
_dumps: Callable[[Any], str] = kombu_json.dumps
_loads: Callable[[str], Any] = kombu_json.loads
#: First character of a stored claim: the rest is the text itself, or JSON.
_TEXT, _JSON = b"s", b"j"
_CLAIM_ID = re.compile(r"[0-9a-f]{32}")
_MEASURED = (str, list, tuple, dict)


@dataclass(frozen=True)
class Offloaded:
    """A call's arguments after offloading: what stays in the message, and the claims that left it."""

    kwargs: dict[str, Any]
    #: Argument name -> claim id (empty: nothing left the message).
    claims: dict[str, str] = field(default_factory=dict)


def offload(redis: Redis, session_id: str, op: str, kwargs: dict[str, Any], threshold: int,
            ttl_s: float) -> Offloaded:
    """Store every top-level argument of ``kwargs`` at least ``threshold`` bytes big (one round trip)."""
    try:
        big = [name for name, value in kwargs.items()
               if threshold > 0 and isinstance(value, _MEASURED) and json_size(value, threshold) >= threshold]
    except RecursionError:
        raise InvalidArgument(op, "arguments nest too deeply to be sent as JSON") from None
    if not big:
        return Offloaded(kwargs)
    claims = {name: uuid.uuid4().hex for name in big}
    pipe = redis.pipeline(transaction=False)
    for name, claim_id in claims.items():
        try:
            encoded = _encode(kwargs[name])
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(op, f"arguments must be JSON-serializable ({exc})") from None
        pipe.set(names.claim_key(session_id, claim_id), encoded, px=int(max(ttl_s, min_ttl_s) * 1000))
    pipe.execute()
    return Offloaded({k: v for k, v in kwargs.items() if k not in claims}, claims)


def held(route: Any) -> dict[str, str]:
    """The claims a call's route names (``{}`` for most calls)."""
    claims = route.get("claims") if isinstance(route, dict) else None
    if not claims:
        return {}
    if not isinstance(claims, dict) or not all(isinstance(k, str) and isinstance(v, str) and _CLAIM_ID.fullmatch(v)
                                               for k, v in claims.items()):
        raise InvalidArgument("route", "claims must map argument names to claim ids")
    return claims


def resolve(redis: Redis, session_id: str, op: str, kwargs: Any, claims: dict[str, str]) -> dict[str, Any]:
    """``kwargs`` with each claimed argument read back from its key (one round trip)."""
    if not isinstance(kwargs, dict):
        raise InvalidArgument(op, "arguments must be a JSON object of keyword arguments")
    stored = redis.mget([names.claim_key(session_id, claim_id) for claim_id in claims.values()])
    missing = [name for name, value in zip(claims, stored) if value is None]
    if missing:
        raise InvalidArgument(op, f"argument(s) {missing} were sent by reference and their stored copy is gone "
                                  "(expired, or this call already ran)")
    return {**kwargs, **{name: _decode(value) for name, value in zip(claims, stored)}}


def _encode(value: Any) -> bytes:
    """A string as its UTF-8 (its JSON round trip is the identity), anything else (or lone surrogates) as JSON."""
    if isinstance(value, str):
        try:
            return _TEXT + value.encode()
        except UnicodeEncodeError:
            pass
    return _JSON + _dumps(value).encode()


def _decode(stored: str) -> Any:
    return stored[1:] if stored[:1] == _TEXT.decode() else _loads(stored[1:])


def discard(redis: Redis, session_id: str, claims: dict[str, str]) -> None:
    """Delete a call's claims (after it ran, or when it could not be sent); on a Redis error their TTL does it."""
    if not claims:
        return
    try:
        redis.delete(*(names.claim_key(session_id, claim_id) for claim_id in claims.values()))
    except RedisError:
        log.warning("could not delete claims %s of session %s; they expire with their TTL",
                    sorted(claims.values()), session_id, exc_info=True)
