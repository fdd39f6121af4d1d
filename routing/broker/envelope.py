"""Checking a popped Redis list item before kombu builds a message from it.

kombu's Redis transport ``json.loads`` the item and indexes the envelope
(``properties``, ``delivery_tag``, ``delivery_info``, the body and its encoding)
with no guard: a wrong item raises out of the worker's event loop and the worker
exits. :func:`parse_item` returns the envelope kombu needs, or raises
:class:`NotAnEnvelope` saying why (with whatever ids could be read). The body's
base64 is left to kombu's own decode (the channel turns its failure into a
dead letter too), so a good message is parsed once, as before.

Recovery (the reaper, the producer's sweep) reads queued items and kombu's un-acked
entries as raw bytes (:func:`raw_command`), whatever the client decodes: one item that
is not UTF-8 or not JSON must never stop it. :class:`UnackedKeys` names where kombu
keeps its un-acked entries, as the broker's transport options configure it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from kombu.utils.json import loads
from redis import Redis
from redis.client import NEVER_DECODE

from routing import names

#: Body encodings kombu's Redis channel decodes (``utf-8`` and none: the body as is).
BODY_ENCODINGS = (None, "base64", "utf-8")
#: Kombu's Redis transport keeps deliveries not yet acknowledged here (its defaults).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: The end of an un-acked entry ``[message, exchange, routing_key]``: read when the message itself is not JSON.
_ENTRY_TAIL = re.compile(rb',\s*"((?:[^"\\]|\\.){0,300})"\s*,\s*"((?:[^"\\]|\\.){0,300})"\s*\]\s*\Z')


@dataclass(frozen=True)
class UnackedKeys:
    """kombu's un-acknowledged deliveries: the hash (tag -> entry) and its index (tag -> time recorded)."""

    hash: str = UNACKED_KEY
    index: str = UNACKED_INDEX_KEY

    @classmethod
    def of(cls, transport_options: Mapping[str, Any] | None) -> UnackedKeys:
        """The keys kombu uses under these ``broker_transport_options`` (``unacked_key``, ``unacked_index_key``)."""
        options = transport_options or {}
        return cls(str(options.get("unacked_key") or UNACKED_KEY),
                   str(options.get("unacked_index_key") or UNACKED_INDEX_KEY))


_unacked_keys = UnackedKeys()


def configure_unacked_keys(transport_options: Mapping[str, Any] | None) -> UnackedKeys:
    """Recovery in this process reads the un-acked keys of these transport options (set where the app is)."""
    global _unacked_keys
    _unacked_keys = UnackedKeys.of(transport_options)
    return _unacked_keys


def unacked_keys() -> UnackedKeys:
    """The un-acked keys configured in this process (kombu's defaults until then)."""
    return _unacked_keys


def raw_command(redis: Redis, *args: Any) -> Any:
    """Run ``args`` on ``redis`` (a pipeline too) and return its reply's bytes undecoded, whatever the client decodes.

    redis-py's per-command ``NEVER_DECODE`` option (what its ``DUMP`` uses); pinned in tests/test_upstream_seams.py.
    """
    return redis.execute_command(*args, **{NEVER_DECODE: []})


class NotAnEnvelope(Exception):
    """A popped item kombu cannot deliver."""

    def __init__(self, problem: str, task_id: str | None = None, task: str | None = None) -> None:
        super().__init__(problem, task_id, task)
        self.problem, self.task_id, self.task = problem, task_id, task


def text_or_none(value: Any) -> str | None:
    """A header value as an id or a name: a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def envelope_problem(payload: Any) -> str | None:
    """Why ``payload`` is not an envelope kombu can deliver, or None."""
    if not isinstance(payload, dict):
        return f"envelope is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "envelope has no properties object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "envelope properties have no delivery_tag string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not (isinstance(info.get("exchange"), str)
                                          and isinstance(info.get("routing_key"), str)):
        return "envelope properties have no delivery_info with exchange and routing_key"
    if not isinstance(payload.get("headers"), dict):
        return "envelope has no headers object"
    if not isinstance(payload.get("body"), str):
        return "envelope has no body string"
    encoding = properties.get("body_encoding")
    if encoding not in BODY_ENCODINGS:
        return f"envelope body_encoding {str(encoding)[:50]!r} is not one of {BODY_ENCODINGS}"
    for field in ("content-type", "content-encoding"):
        if (value := payload.get(field)) is not None and not isinstance(value, str):
            return f"envelope {field} is not a string"
    return None


def parse_item(item: bytes | str) -> dict[str, Any]:
    """The envelope in a popped list item; raises :class:`NotAnEnvelope` when there is none."""
    try:
        payload = loads(item)  # type: ignore[no-untyped-call]
    except Exception as exc:  # not JSON, not UTF-8, nested too deep: all the same to the queue
        raise NotAnEnvelope(f"item is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    problem = envelope_problem(payload)
    if problem is None:
        return cast(dict[str, Any], payload)
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if isinstance(headers, dict):
        raise NotAnEnvelope(problem, text_or_none(headers.get("id")), text_or_none(headers.get("task")))
    raise NotAnEnvelope(problem)


def task_id_of(raw: Any) -> str | None:
    """The task id in a kombu message envelope, raw or parsed (None if it is not one: poison is the worker's)."""
    try:
        envelope = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        task_id = envelope["headers"]["id"]
    except Exception:  # not JSON (or not UTF-8, or nested too deep), or not an envelope
        return None
    return task_id if isinstance(task_id, str) else None


def unacked_parts(entry: bytes) -> tuple[Any, str | None]:
    """The message and routing key of an un-acked entry (``[message, exchange, routing_key]``).

    The message is None when the entry is not that JSON (not UTF-8, nested too deep, ...); the routing key is then
    read from the entry's end when it can be, so a bad entry can still be told apart by its queue.
    """
    try:
        message, _exchange, routing_key = json.loads(entry)
        return message, routing_key if isinstance(routing_key, str) else None
    except Exception:  # not JSON, not UTF-8, too deep, not three parts
        pass
    match = _ENTRY_TAIL.search(entry[-1024:])
    try:
        return None, json.loads(b'"' + match.group(2) + b'"') if match else None
    except ValueError:
        return None, None


def sent_at(envelope: Any) -> float | None:
    """When a session call was sent (its route's ``sent_at``, epoch seconds), or None for anything else."""
    try:
        if envelope["headers"].get("task") != names.CALL_TASK:
            return None
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        value = json.loads(body)[0][3]["sent_at"]
    except Exception:  # not a call as the router sends it: no send time to order by
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
