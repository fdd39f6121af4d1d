"""Many calls of one operation in few messages: chunking on the way out, per-item results on the way back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from routing.errors import FlagshipError, InvalidArgument, error_from_json
from routing.producer.future import CallFuture, gather

#: Items per ``map`` message unless the caller says otherwise.
default_chunk_size = 500


def chunks(op: str, kwargs_list: Iterable[dict[str, Any]], chunk_size: int | None) -> list[list[dict[str, Any]]]:
    """``kwargs_list`` checked at the door and cut into message-sized chunks, in order."""
    if not isinstance(op, str) or not op:
        raise InvalidArgument("map", "op must be an operation name")
    items = list(kwargs_list)
    if not all(isinstance(kwargs, dict) for kwargs in items):
        raise InvalidArgument(op, "each item of a map must be a dict of keyword arguments")
    size = default_chunk_size if chunk_size is None else chunk_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgument("map", "chunk_size must be a positive integer")
    return [items[i:i + size] for i in range(0, len(items), size)]


def collect(futures: list[CallFuture], timeout_s: float | None, return_exceptions: bool) -> list[Any]:
    """Every item's result in order (see :func:`decode`)."""
    return decode(gather(futures, timeout_s), return_exceptions)


def decode(replies: list[list[dict[str, Any]]], return_exceptions: bool) -> list[Any]:
    """Per-item results in order; a failing item raises its typed error (the first, once all ran),
    or stands in its place with ``return_exceptions``."""
    results: list[Any] = []
    first_error: FlagshipError | None = None
    for reply in replies:
        for entry in reply:
            if "error" not in entry:
                results.append(entry["ok"])
                continue
            error = error_from_json(entry["error"])
            first_error = first_error or error
            results.append(error if return_exceptions else None)
    if first_error is not None and not return_exceptions:
        raise first_error
    return results
