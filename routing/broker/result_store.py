"""The workers' result backend: Celery's Redis backend with each result stored in one atomic round trip.

Celery's ``_store_result`` reads the stored result first (a completed call's
SUCCESS is never overwritten by a lost duplicate), then writes it with
``MULTI/SET/PUBLISH/EXEC``: two round trips, five commands, and a window
between the read and the write. Here one script (``store_unless_succeeded.lua``)
checks and writes, with the same key, value, expiry and channel, so producers
(ours, or Celery's result consumer) see no difference. It keeps any final result
(a FAILURE or REVOKED too): the outcome a caller saw stands against a late run. A call whose
message names a reply channel (``reply_to``, ``routing.names.reply_channel``) has
its result published there too: the producer that sent it listens on that one
channel instead of subscribing per call. On a worker whose broker is this server,
a SUCCESS also acknowledges its message in the same script (``routing.broker.result_acks``).
"""

from __future__ import annotations

import json
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.commands.core import Script

from routing import names
from routing.broker import result_acks
from routing.broker.connect import is_sentinel
from routing.broker.envelope import UNACKED_INDEX_KEY, UNACKED_KEY
from routing.broker.scripts import source

__all__ = ["StoreBackend", "SentinelStoreBackend", "store_backend_url", "ACK_WITH_RESULT", "DEFAULT_ACK_KEYS"]

#: Celery setting a worker sets when its broker is its result backend (``{"hash": ..., "index": ...}``: kombu's
#: un-acked keys): a SUCCESS is stored and its message acknowledged in the same script (``routing.broker.result_acks``).
ACK_WITH_RESULT = "flagship_ack_with_result"
#: kombu's Redis un-acked keys (``unacked_key``, ``unacked_index_key``), named even when nothing is acknowledged.
DEFAULT_ACK_KEYS = {"hash": UNACKED_KEY, "index": UNACKED_INDEX_KEY}


class AtomicStore:
    """``_store_result`` in one ``EVALSHA`` (mixed into Celery's Redis backends)."""

    _store_script: Script | None = None

    # replaces Celery 5.7.0 BaseKeyValueStoreBackend._store_result (and reproduces RedisBackend.set, _set,
    # _set_with_state: the same key, value, expiry and channel); pinned in tests/test_upstream_seams.py
    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        backend: Any = self
        reply = names.reply_channel_or_none(getattr(request, "reply_to", None))
        if backend.serializer != "json" or backend.app.conf.result_compression:
            # The script reads a stored result as JSON: anything else takes Celery's own two round trips,
            # and the reply channel is told only which call to read.
            stored = super()._store_result(task_id, result, state, traceback, request, **kwargs)  # type: ignore[misc]
            if reply:
                pointer = json.dumps({"task_id": bytes_to_str(task_id)})  # type: ignore[no-untyped-call]
                backend.ensure(backend.client.publish, (reply, pointer))
            return stored
        meta = backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)  # type: ignore[no-untyped-call]
        value = backend.encode(meta)
        if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = backend.failure_expires if state == states.FAILURE else None
        if expires is None:
            expires = backend.expires
        key = backend.get_key_for_task(task_id)
        acks = backend.app.conf.get(ACK_WITH_RESULT)
        # Only the task's own SUCCESS acknowledges its delivery (not update_state, not another task's result).
        own = acks and state == states.SUCCESS and getattr(request, "id", None) == meta["task_id"]
        tag = _delivery_tag(request) if own else None
        _, acked = backend.ensure(self._store_unless_succeeded,
                                  (key, value, expires, reply, tag, acks or DEFAULT_ACK_KEYS))
        if tag and acked:  # the record was there, on this server: Celery's ack has nothing left to remove
            result_acks.remember(tag)
        return result

    def _store_unless_succeeded(self, key: Any, value: Any, expires: float | None, reply: str | None,
                                tag: str | None, acks: dict[str, str]) -> list[int]:
        client = self.client  # type: ignore[attr-defined]
        if self._store_script is None:
            self._store_script = client.register_script(source("store_unless_succeeded"))
        return list(self._store_script(keys=[key, acks["hash"], acks["index"]],
                                       args=[value, int((expires or 0) * 1000), reply or "", tag or ""],
                                       client=client))


def _delivery_tag(request: Any) -> str | None:
    """The broker delivery tag of the message a task request came in (None: not from a broker, e.g. eager)."""
    properties = getattr(request, "properties", None)
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return tag if isinstance(tag, str) and tag else None


class StoreBackend(AtomicStore, RedisBackend):  # type: ignore[misc]
    pass


class SentinelStoreBackend(AtomicStore, SentinelBackend):  # type: ignore[misc]
    pass


def store_backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting that makes a Celery app use :class:`StoreBackend` (or its Sentinel twin)."""
    backend = SentinelStoreBackend if is_sentinel(redis_url) else StoreBackend
    return f"{__name__}:{backend.__name__}+{redis_url}"
