"""A stored call result (Celery's result meta) turned into its future's outcome, whatever the stored bytes hold."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from celery import states

__all__ = ["decoded", "final", "settle"]


def decoded(backend: Any, raw: bytes) -> dict[str, Any] | BaseException:
    """The result meta in ``raw``, or the error decoding it (an unreadable result fails its own call only)."""
    try:
        meta = backend.decode_result(raw)
    except Exception as exc:
        return exc
    return meta if isinstance(meta, dict) else ValueError(f"a stored result is not a mapping: {type(meta).__name__}")


def final(meta: dict[str, Any] | BaseException) -> bool:
    """Whether ``meta`` settles its call: a ready state, or an unreadable result."""
    return isinstance(meta, BaseException) or meta.get("status") in states.READY_STATES


def settle(future: Future[Any], backend: Any, meta: dict[str, Any] | BaseException) -> None:
    """Settle ``future`` with the call's return value, or its error as Celery rebuilds it."""
    if isinstance(meta, BaseException):
        future.set_exception(meta)
    elif meta["status"] == states.SUCCESS:
        future.set_result(meta["result"])
    else:
        try:
            error = backend.exception_to_python(meta["result"])
        except Exception as exc:  # a failure Celery cannot rebuild still fails its call
            error = exc
        future.set_exception(error)
