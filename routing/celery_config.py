"""Celery settings shared by workers and producers: JSON only, nothing lost."""

from __future__ import annotations

from typing import Any

from routing.settings import Settings


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    transport = {
        # An un-acked message (its worker died) returns to its queue after this long.
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        # JSON only: nothing a producer sends is ever unpickled.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # A call is acknowledged only after it ran; a killed worker's calls are redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # One reserved message per thread: a busy worker leaves calls in the queue.
        "worker_prefetch_multiplier": 1,
        "result_expires": 3600,
        "result_extended": False,
        "task_track_started": False,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": "flagship.default",
    }
