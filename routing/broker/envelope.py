"""Checking a popped Redis list item before kombu builds a message from it.

kombu's Redis transport ``json.loads`` the item and indexes the envelope
(``properties``, ``delivery_tag``, ``delivery_info``, the body and its encoding)
with no guard: a wrong item raises out of the worker's event loop and the worker
exits. :func:`parse_item` returns the envelope kombu needs, or raises
:class:`NotAnEnvelope` saying why (with whatever ids could be read). The body's
base64 is left to kombu's own decode (the channel turns its failure into a
dead letter too), so a good message is parsed once, as before.
"""

from __future__ import annotations

import json
from typing import Any, cast

from kombu.utils.json import loads

#: Body encodings kombu's Redis channel decodes (``utf-8`` and none: the body as is).
BODY_ENCODINGS = (None, "base64", "utf-8")
#: Kombu's Redis transport keeps deliveries not yet acknowledged here (its defaults).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


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
    except (ValueError, TypeError, KeyError, RecursionError):  # not JSON (or not UTF-8), or not an envelope
        return None
    return task_id if isinstance(task_id, str) else None
