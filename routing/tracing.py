"""OpenTelemetry traces: set up from the standard environment, a span per call, W3C context in the task headers.

With ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; ``none`` for nothing) or an OTLP
endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, a
producer (``Client``) and a worker each install an SDK ``TracerProvider`` with a
``BatchSpanProcessor`` once (:func:`setup`); the rest of the ``OTEL_*`` environment
(``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, the exporter's headers and
timeouts) is read by the SDK itself. The SDK and the exporter are the ``[tracing]`` extra;
``opentelemetry-api`` alone is in the base install.

Without either, nothing is set up and nothing is sent: :func:`tracer` is None (unless the
application installed a provider of its own, which is then used), every helper here returns at
once, no header is added to a message. That path costs a global read and a type check per call.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

__all__ = ["CallTrace", "OFF", "call_span", "exporters_wanted", "flush", "mark_failed", "setup", "span", "tracer"]

log = logging.getLogger(__name__)

#: The instrumentation scope of every span of this project.
TRACER_NAME = "flagship"
#: ``OTEL_EXPORTER_OTLP_PROTOCOL`` values that mean the gRPC exporter (any other: OTLP over HTTP/protobuf).
GRPC_PROTOCOLS = frozenset({"grpc"})

_lock = threading.Lock()
_installed: Any = None  # the SDK TracerProvider this process installed
_tracer: trace.Tracer | None = None
_stopped = False  # shutdown() ran: tracing is off for the rest of the process


def exporters_wanted(environ: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment names ([]: tracing off). An OTLP endpoint alone means ``otlp``."""
    environ = os.environ if environ is None else environ
    named = environ.get("OTEL_TRACES_EXPORTER")
    if named is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [name for name in (part.strip().lower() for part in named.split(",")) if name and name != "none"]


def setup(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install the SDK provider the environment asks for, once per process; True if spans are exported.

    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` wins). A provider the
    application set already is kept. Without the SDK installed, a warning says which extra to install.
    """
    global _installed
    environ = os.environ if environ is None else environ
    wanted = exporters_wanted(environ)
    with _lock:
        if _installed is not None or not wanted or _stopped:
            return _installed is not None
        if tracer() is not None:
            return True  # the application's own provider
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("OpenTelemetry exporter %s configured but opentelemetry-sdk is not installed: no traces "
                        "(pip install 'flagship-dspy-pools[tracing]')", ",".join(wanted))
            return False
        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        provider = TracerProvider(resource=resource)
        exporters = [exporter for exporter in (_exporter(name, environ) for name in wanted) if exporter is not None]
        if not exporters:
            return False
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _installed = provider
        return True


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    """The span exporter called ``name`` (None, with a warning, when unknown or not installed)."""
    try:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol in GRPC_PROTOCOLS:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter()
    except ImportError as exc:
        log.warning("span exporter %r is not installed (%s): pip install 'flagship-dspy-pools[tracing]'", name, exc)
        return None
    log.warning("unknown OTEL_TRACES_EXPORTER %r (known here: otlp, console): ignored", name)
    return None


def tracer() -> trace.Tracer | None:
    """This process's tracer; None while no real provider is installed (tracing off: every helper is a no-op)."""
    global _tracer
    if _tracer is None:
        if _stopped:
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return None
        _tracer = provider.get_tracer(TRACER_NAME)
    return _tracer


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (a worker at shutdown; cheap when nothing is buffered)."""
    if _installed is not None:
        _installed.force_flush(int(timeout_s * 1000))


def shutdown() -> None:
    """Flush and stop the exporters this process installed; tracing is off from then on (a worker at exit)."""
    global _installed, _tracer, _stopped
    with _lock:
        provider, _installed, _tracer, _stopped = _installed, None, None, True
    if provider is not None:
        provider.shutdown()


def mark_failed(span: Span, error_type: str, description: str | None = None) -> None:
    """An error status and ``error.type`` on ``span``: the error's type name, never its text (which may quote LM
    output or a call's inputs)."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description or error_type))


class CallTrace:
    """A call's producer span and the headers carrying its context to the worker (both None: tracing off)."""

    __slots__ = ("span", "headers")

    def __init__(self, span: Span | None = None, headers: dict[str, str] | None = None) -> None:
        self.span = span
        self.headers = headers

    def end_on(self, reply: Future[Any]) -> None:
        """End the span when ``reply`` settles: the worker that ran it, or the typed error's name; or, for a call
        nobody waits for any more (its caller timed out and let go, or cancelled it), when ``reply`` is dropped."""
        if self.span is not None:
            reply.add_done_callback(self._end)
            weakref.finalize(reply, self._let_go)

    def _let_go(self) -> None:
        span = self.span
        if span is not None and span.is_recording():
            mark_failed(span, "CallAbandoned", "nobody waits for the call any more")
            span.end()

    def _end(self, reply: Future[Any]) -> None:
        span = self.span
        assert span is not None
        error = None if reply.cancelled() else reply.exception()
        if reply.cancelled() or error is not None:
            mark_failed(span, "CancelledError" if error is None else type(error).__name__)
        else:
            envelope = reply.result()
            if isinstance(envelope, dict) and envelope.get("node"):
                span.set_attribute("flagship.worker", str(envelope["node"]))
        span.end()


#: What a call gets while tracing is off.
OFF = CallTrace()


def call_span(op: str, task_id: str, session_id: str, pool: str, affinity: str, worker: str | None) -> CallTrace:
    """Start ``flagship.call <op>`` as a child of the caller's current span; its context goes in the message."""
    active = tracer()
    if active is None:
        return OFF
    span = active.start_span(f"flagship.call {op}", kind=SpanKind.PRODUCER, attributes={
        "flagship.op": op, "flagship.task_id": task_id, "flagship.session_id": session_id, "flagship.pool": pool,
        "flagship.affinity": affinity, "flagship.worker_bound": worker or "", "messaging.system": "celery"})
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return CallTrace(span, headers)


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span around a block, current inside it (so the calls sent there are its children); None when off."""
    active = tracer()
    if active is None:
        yield None
        return
    with active.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            mark_failed(current, type(exc).__name__)
            raise
