"""Celery settings shared by workers and producers: JSON only, nothing lost.

The broker transports (shared client, poison guard, Sentinel) are in :mod:`routing.broker.transport`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from routing.broker.connect import SentinelOptions, is_sentinel
from routing.broker.result_store import store_backend_url
from routing.broker.tls import tls_url
from routing.broker.transport import (
    SENTINEL_TRANSPORT,
    SHARED_CLIENT_TRANSPORT,
    TLS_TRANSPORT,
    RedisTransport,
    SharedClientChannel,
)
from routing.settings import Settings

__all__ = ["SENTINEL_TRANSPORT", "SHARED_CLIENT_TRANSPORT", "TLS_TRANSPORT", "RedisTransport", "SharedClientChannel",
           "celery_config"]


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    redis_url = tls_url(redis_url)  # rediss://: verify the server's certificate, FLAGSHIP_REDIS_CA_FILE
    transport = {
        # An un-acked message (its worker died) returns to its queue after this long.
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }
    config: dict[str, Any] = {
        "broker_url": redis_url,
        # Celery's Redis backend storing each result in one atomic round trip (producers swap in their listener).
        "result_backend": store_backend_url(redis_url),
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
        # A broker connection blip does not cancel running calls: they finish, and their deliveries stay recorded
        # un-acked meanwhile (routing.broker.transport), so nothing runs twice. (Celery 5's default, set explicitly.)
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # One reserved message per thread (calls parked for their session's turn do not count: tasks.worker.turns).
        "worker_prefetch_multiplier": 1,
        "result_expires": 3600,
        "result_extended": False,
        "task_track_started": False,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": "flagship.default",
    }
    scheme = urlsplit(redis_url).scheme
    if scheme in ("redis", "rediss"):
        config["broker_transport"] = TLS_TRANSPORT if scheme == "rediss" else SHARED_CLIENT_TRANSPORT
    elif is_sentinel(redis_url):
        # The broker and Celery's result backend ask the sentinels for the primary on every new connection.
        sentinel = SentinelOptions.from_env().transport_options()
        config["broker_transport"] = SENTINEL_TRANSPORT
        transport.update(sentinel)
        config["result_backend_transport_options"].update(sentinel)
    return config
