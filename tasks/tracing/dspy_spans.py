"""DSPy's callbacks as spans: each module and predictor call, LM request, tool call and sandbox execute.

DSPy 3.4.1 calls a ``BaseCallback``'s ``on_*_start`` and ``on_*_end`` around each of
those on the thread (or asyncio task) that runs it; the span started is made current
until its end, so what runs inside nests under it, and the LM governor
(``tasks.lm.governor``) sets the request's tokens, cost, cache hit and rate-limit
wait on the LM span (:func:`lm_attributes`). Added around each call only when tracing is on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span

from routing import tracing


def _model(instance: Any) -> str:
    return str(getattr(instance, "model", "") or type(instance).__name__)


class SpanCallbacks(BaseCallback):
    """Starts a span at each ``on_*_start`` and ends it at the matching ``on_*_end`` (by DSPy's call id)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Span, object]] = {}
        self._lock = threading.Lock()

    def _start(self, call_id: str, name: str, attributes: dict[str, Any]) -> None:
        active = tracing.tracer()
        if active is None:
            return
        span = active.start_span(name, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._open[call_id] = (span, token)

    def _end(self, call_id: str, exception: BaseException | None) -> None:
        with self._lock:
            opened = self._open.pop(call_id, None)
        if opened is None:
            return
        span, token = opened
        try:
            otel_context.detach(token)  # type: ignore[arg-type]
        except Exception:  # ended on another context than it started (never in DSPy 3.4.1): the span still ends
            pass
        if exception is not None:
            tracing.mark_failed(span, type(exception).__name__)
        span.end()

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        kind = type(instance).__name__
        attributes: dict[str, Any] = {"dspy.module": kind}
        signature = getattr(instance, "signature", None)
        if signature is not None and hasattr(signature, "signature"):
            attributes["dspy.signature"] = str(signature.signature)
        self._start(call_id, f"dspy.{kind}", attributes)

    def on_module_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        model = _model(instance)
        provider = model.split("/", 1)[0] if "/" in model else "unknown"
        self._start(call_id, f"chat {model}", {"gen_ai.operation.name": "chat", "gen_ai.request.model": model,
                                               "gen_ai.provider.name": provider})

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)

    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        name = str(getattr(instance, "name", "") or type(instance).__name__)
        self._start(call_id, f"execute_tool {name}", {"gen_ai.operation.name": "execute_tool",
                                                     "gen_ai.tool.name": name})

    def on_tool_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)

    def on_interpreter_execute_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        code = inputs.get("code")
        self._start(call_id, "sandbox.execute", {"flagship.sandbox": type(instance).__name__,
                                                 "flagship.code_chars": len(code) if isinstance(code, str) else 0})

    def on_interpreter_execute_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        self._end(call_id, exception)

    def on_interpreter_tool_call_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        name = str(inputs.get("tool_name") or "tool")
        self._start(call_id, f"sandbox.tool {name}", {"gen_ai.tool.name": name})

    def on_interpreter_tool_call_end(self, call_id: str, outputs: Any,
                                     exception: BaseException | None = None) -> None:
        self._end(call_id, exception)


_callbacks = SpanCallbacks()


@contextmanager
def traced_dspy() -> Iterator[None]:
    """DSPy calls inside get spans: the span callbacks added to DSPy's callbacks for this call only.

    ``dspy.context`` rather than ``dspy.configure``: it leaves DSPy's global settings (and which thread
    may change them) to the user's programs; DSPy carries it into ``dspy.Parallel``'s threads and the
    worker's batch threads copy it.
    """
    with dspy.context(callbacks=[*(dspy.settings.get("callbacks") or []), _callbacks]):
        yield


def lm_attributes(attributes: dict[str, Any]) -> None:
    """Set ``gen_ai.<key>`` attributes on the current span when it records (an LM request's, in the governor)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"gen_ai.{key}": value for key, value in attributes.items() if value is not None})
