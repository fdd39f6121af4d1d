"""The worker's span of one call (``flagship.run <op>``), set up and flushed with the worker's life.

The span continues the trace whose context the producer put in the task message's headers
(W3C ``traceparent``/``tracestate``), so the producer's ``flagship.call`` span is its parent.
It carries how long the call waited: on the queue (since the producer sent it, both hosts'
clocks), and on this worker before it started (its session's turn, a free thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import signals
from opentelemetry import propagate
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind

from routing import names, tracing
from routing.broker.deadletter import DELIVERIES_HEADER
from tasks.tracing import dspy_spans

log = logging.getLogger(__name__)

#: Receipt times kept for calls not started yet, at most (the oldest are dropped first).
max_received = 100_000

_received: dict[str, float] = {}  # task id -> when this worker received it (monotonic), while tracing is on
_received_lock = threading.Lock()


class _RequestHeaders(Getter[Any]):
    """Reads a header off Celery's task request (its message headers are attributes of ``task.request``)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return []


_headers = _RequestHeaders()


@contextmanager
def run_span(request: Any, node: str | None, session_id: Any, op: Any, kwargs: Any, route: Any) -> Iterator[None]:
    """``flagship.run <op>`` around the call, current inside it; nothing when tracing is off."""
    active = tracing.tracer()
    if active is None:
        yield
        return
    started = time.monotonic()
    with _received_lock:
        received = _received.pop(getattr(request, "id", None) or "", None)
    sent_at = route.get("sent_at") if isinstance(route, dict) else None
    delivery = getattr(request, "delivery_info", None) or {}
    attributes: dict[str, Any] = {
        "flagship.op": str(op), "flagship.session_id": str(session_id), "flagship.worker": node or "",
        "flagship.task_id": str(getattr(request, "id", "")), "messaging.system": "celery",
        "flagship.attempt": 1 + int(getattr(request, DELIVERIES_HEADER, 0) or 0),
        "flagship.redelivered": bool(delivery.get("redelivered") or getattr(request, "redelivered", None)),
        "flagship.resent": bool(getattr(request, names.RESENT_HEADER, None)),
        "flagship.rehydration": isinstance(kwargs, dict) and "ref_id" in kwargs,
    }
    if isinstance(route, dict):
        attributes["flagship.pool"] = str(route.get("pool") or "")
        attributes["flagship.affinity"] = str(route.get("affinity") or "")
    if isinstance(sent_at, (int, float)) and not isinstance(sent_at, bool):
        attributes["flagship.queue_wait_s"] = round(max(0.0, time.time() - sent_at), 6)
    if received is not None:
        attributes["flagship.turn_wait_s"] = round(started - received, 6)
    parent = propagate.extract(request, getter=_headers)
    with active.start_as_current_span(f"flagship.run {op}", context=parent, kind=SpanKind.CONSUMER,
                                      attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            with dspy_spans.traced_dspy():
                yield
        except BaseException as exc:
            tracing.mark_failed(span, type(exc).__name__)
            raise


def _on_received(request: Any, **_: Any) -> None:
    with _received_lock:
        if len(_received) >= max_received:
            _received.pop(next(iter(_received)))
        _received[request.id] = time.monotonic()


@signals.celeryd_after_setup.connect
def _setup(sender: str, **_: Any) -> None:
    """The worker's tracer provider, from the ``OTEL_*`` environment; off without an exporter named there."""
    if not tracing.setup("flagship-worker"):
        return
    signals.task_received.connect(_on_received, weak=False)
    log.info("worker %s exports OpenTelemetry spans", sender)


@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    """Spans still buffered leave before the process does."""
    try:
        tracing.shutdown()
    except Exception:  # an unreachable collector never blocks the worker's exit
        log.warning("flushing spans at shutdown failed", exc_info=True)
