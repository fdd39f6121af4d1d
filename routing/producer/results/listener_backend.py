"""The producer's Celery result backend: Celery's Redis backend without its own per-call subscription.

The producer's :class:`routing.producer.results.listener.ResultListener` is woken by Redis
instead; Celery's result consumer would open a second subscription that nobody drains.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

from routing.broker.connect import is_sentinel

__all__ = ["ListenerBackend", "ListenerSentinelBackend", "listener_backend_url"]


class ListenerBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, minus its own per-call subscription on send.

    The producer's :class:`ResultListener` subscribes instead; Celery's result
    consumer would open a second subscription that nobody drains.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class ListenerSentinelBackend(SentinelBackend):  # type: ignore[misc]
    """The same over Sentinel (``result_backend_transport_options`` name the primary)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def listener_backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting that makes a Celery app use :class:`ListenerBackend` (or its Sentinel twin)."""
    backend = ListenerSentinelBackend if is_sentinel(redis_url) else ListenerBackend
    return f"{__name__}:{backend.__name__}+{redis_url}"
