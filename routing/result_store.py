"""The workers' result backend: Celery's Redis backend with each result stored in one atomic round trip.

Celery's ``_store_result`` reads the stored result first (a completed call's
SUCCESS is never overwritten by a lost duplicate), then writes it with
``MULTI/SET/PUBLISH/EXEC``: two round trips, five commands, and a window
between the read and the write. Here one script (``store_unless_succeeded.lua``)
does the same check and writes, with the same key, value, expiry and channel, so
producers (ours, or Celery's result consumer) see no difference. A call whose
message names a reply channel (``reply_to``, ``routing.names.reply_channel``) has
its result published there too: the producer that sent it listens on that one
channel instead of subscribing per call.
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
from routing.connect import is_sentinel
from routing.scripts import source

__all__ = ["StoreBackend", "SentinelStoreBackend", "store_backend_url"]


class AtomicStore:
    """``_store_result`` in one ``EVALSHA`` (mixed into Celery's Redis backends)."""

    _store_script: Script | None = None

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
        backend.ensure(self._store_unless_succeeded, (key, value, expires, reply))
        return result

    def _store_unless_succeeded(self, key: Any, value: Any, expires: float | None, reply: str | None) -> None:
        client = self.client  # type: ignore[attr-defined]
        if self._store_script is None:
            self._store_script = client.register_script(source("store_unless_succeeded"))
        self._store_script(keys=[key], args=[value, int((expires or 0) * 1000), reply or ""], client=client)


class StoreBackend(AtomicStore, RedisBackend):  # type: ignore[misc]
    pass


class SentinelStoreBackend(AtomicStore, SentinelBackend):  # type: ignore[misc]
    pass


def store_backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting that makes a Celery app use :class:`StoreBackend` (or its Sentinel twin)."""
    backend = SentinelStoreBackend if is_sentinel(redis_url) else StoreBackend
    return f"{__name__}:{backend.__name__}+{redis_url}"
