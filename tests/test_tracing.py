"""OpenTelemetry traces end to end: a local OTLP/HTTP receiver collects the spans of this process and real workers.

The receiver decodes ``ExportTraceServiceRequest`` protobufs (``opentelemetry-proto``). Workers of
``trace_pool`` export to it; ``trace_off_pool``'s worker names the receiver but ``OTEL_TRACES_EXPORTER=none``.
LM requests go to a local OpenAI-protocol server (``tests/fake_openai.py``).
"""

from __future__ import annotations

import gc
import gzip
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dspy
import pytest
from celery import signals
from dspy.primitives.code_interpreter import CodeExecutionError
from dspy.utils.callback import with_callbacks
from fake_openai import FakeOpenAI
from helpers import wait_until
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.util._once import Once

from routing import Client, Settings, tracing
from routing.errors import CallTimeout
from tasks.local.stack import Stack, WorkerProcess
from tasks.tracing.dspy_spans import SpanCallbacks

POOL, OFF_POOL = "trace_pool", "trace_off_pool"
#: Spans leave a process every 50 ms (the SDK's default is 5 s).
OTEL_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "always_on"}


class Receiver:
    """A local OTLP/HTTP trace endpoint: every span received, as a dict, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.take(self.path, body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def take(self, path: str, body: bytes) -> None:
        assert path == "/v1/traces", path
        request = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append({
                        "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(), "service": resource.get("service.name"),
                        "status": span.status.code, "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                    })
        with self._lock:
            self.requests += 1
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


@pytest.fixture(scope="module")
def workers(stack: Stack, receiver: Receiver) -> Iterator[list[WorkerProcess]]:
    on = {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "trace-test-worker"}
    off = {**on, "OTEL_TRACES_EXPORTER": "none"}
    started = [stack.start_worker(POOL, wait=False, env=on) for _ in range(2)]
    started.append(stack.start_worker(OFF_POOL, wait=False, env=off))
    stack.wait_ready(started)
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _forget_global_provider() -> None:
    """Undo ``trace.set_tracer_provider`` for the rest of the test run (opentelemetry-api 1.45's set-once latch
    and global, reset as its own test utilities' ``reset_trace_globals`` does)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(scope="module")
def traced(stack: Stack, receiver: Receiver, workers: list[WorkerProcess]) -> Iterator[Client]:
    """A client of this process with tracing on (the SDK provider installed from the OTEL_* environment)."""
    env = {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "trace-test-producer"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    client = Client(stack.redis_url, Settings.from_env())
    try:
        yield client
    finally:
        client.close()
        tracing.shutdown()
        _forget_global_provider()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _descends(span: dict[str, Any], ancestor: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> bool:
    """``span`` is ``ancestor`` or below it (following parent ids through spans received)."""
    while span is not ancestor and span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
    return span is ancestor


def test_exporters_come_from_the_standard_environment() -> None:
    assert tracing.exporters_wanted({}) == []
    assert tracing.exporters_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert tracing.exporters_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                     "OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]


def test_without_an_exporter_nothing_is_set_up_and_nothing_is_sent(
    stack: Stack, receiver: Receiver, workers: list[WorkerProcess]
) -> None:
    client = Client(stack.redis_url, Settings.from_env())  # this process: no OTEL_* variable set
    try:
        assert tracing.tracer() is None
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert tracing.call_span("call", "t", "s", OFF_POOL, "strict_queue", None) is tracing.OFF
        session = client.session(OFF_POOL)
        module = session.chain_of_thought("question -> answer")
        for i in range(5):
            assert module(question=f"off {i}").answer
        session.close()
    finally:
        client.close()
    # The worker names the receiver but OTEL_TRACES_EXPORTER=none: a traced worker would have sent within ~50 ms.
    time.sleep(1.0)
    assert receiver.requests == 0 and receiver.spans == []


def test_one_trace_per_call_from_the_producer_span_to_the_lm_request(
    traced: Client, receiver: Receiver, server: FakeOpenAI
) -> None:
    session = traced.session(POOL)
    module = session.chain_of_thought("question -> answer", lm=session.lm("trace-model", api_base=server.base_url))
    future = module.submit(question="why is the sky blue?")
    assert future.result(30).answer
    call = wait_until(lambda: next((s for s in receiver.spans if s["attributes"].get("flagship.task_id") == future.id
                                    and s["name"] == "flagship.call call"), None), what="the producer's call span")
    assert call["parent_id"] == "" and call["service"] == "trace-test-producer"
    wanted = {"flagship.run call", "dspy.ChainOfThought", "dspy.Predict", "chat openai/trace-model"}
    spans = wait_until(lambda: (lambda t: t if wanted <= {s["name"] for s in t} else None)(
        receiver.trace(call["trace_id"])), what="the worker's spans of the call")
    by_id = {s["span_id"]: s for s in spans}
    names = sorted(s["name"] for s in spans)
    assert all(_descends(s, call, by_id) for s in spans), names
    run = next(s for s in spans if s["name"] == "flagship.run call")
    assert run["parent_id"] == call["span_id"] and run["service"] == "trace-test-worker"
    for span in (call, run):
        assert span["attributes"]["flagship.session_id"] == session.id
        assert span["attributes"]["flagship.worker"] == session.worker
    assert run["attributes"]["flagship.queue_wait_s"] >= 0 and run["attributes"]["flagship.attempt"] == 1
    lm = next(s for s in spans if s["name"] == "chat openai/trace-model")
    predict = next(s for s in spans if s["name"] == "dspy.Predict")
    assert _descends(lm, predict, by_id)
    assert lm["attributes"]["gen_ai.request.model"] == "openai/trace-model"
    assert lm["attributes"]["gen_ai.usage.input_tokens"] > 0 and lm["attributes"]["gen_ai.usage.output_tokens"] > 0
    assert lm["attributes"]["gen_ai.cache_hit"] is False
    session.close()


def test_a_map_of_50_examples_is_one_trace_with_every_worker_span_attached(
    traced: Client, receiver: Receiver, server: FakeOpenAI
) -> None:
    with tracing.span("test.parent") as parent:
        assert parent is not None
        result = traced.map(POOL, "question -> answer", [{"question": f"q{i}"} for i in range(50)],
                            lm={"model": "trace-model", "api_base": server.base_url}, chunk_size=10)
    assert len(result.outputs) == 50 and not result.failures
    trace_id = format(parent.get_span_context().trace_id, "032x")

    def complete() -> list[dict[str, Any]] | None:
        spans = receiver.trace(trace_id)
        lm_spans = [s for s in spans if s["name"].startswith("chat ")]
        runs = [s for s in spans if s["name"] == "flagship.run map"]
        ours = {"test.parent", "flagship.map call"} <= {s["name"] for s in spans}  # this process's, ended last
        return spans if len(lm_spans) == 50 and len(runs) == 5 and ours else None

    spans = wait_until(complete, timeout_s=20, what="the map's 50 LM spans")
    by_id = {s["span_id"]: s for s in spans}
    root = next(s for s in spans if s["name"] == "test.parent")
    orphans = [s["name"] for s in spans if s is not root and s["parent_id"] not in by_id]
    assert orphans == []
    fleet_map = next(s for s in spans if s["name"] == "flagship.map call")
    assert fleet_map["parent_id"] == root["span_id"]
    chunks = [s for s in spans if s["name"] == "flagship.call map"]
    assert len(chunks) == 5 and all(s["parent_id"] == fleet_map["span_id"] for s in chunks)
    assert sum(1 for s in spans if s["name"] == "dspy.Predict") == 50
    assert {s["attributes"]["flagship.worker"] for s in spans if s["name"] == "flagship.run map"} <= set(
        result.per_worker)
    assert all(_descends(s, fleet_map, by_id) for s in spans if s["service"] == "trace-test-worker")


def test_a_call_sent_through_send_task_carries_its_trace_context_too(traced: Client, receiver: Receiver) -> None:
    """A publish signal receiver makes the router use Celery's ``send_task`` (routing/producer/publish.py)."""
    def watching(**_: Any) -> None:
        pass

    session = traced.session(POOL)
    signals.before_task_publish.connect(watching)
    try:
        future = session.submit("ping")
        assert future.result(10)["node"] == session.worker
    finally:
        signals.before_task_publish.disconnect(watching)
        session.close()

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        mine = {s["name"]: s for s in receiver.spans if s["attributes"].get("flagship.task_id") == future.id}
        return (mine["flagship.call ping"], mine["flagship.run ping"]) if len(mine) == 2 else None

    call, run = wait_until(both, what="the call's producer and worker spans")  # type: ignore[misc]
    assert run["trace_id"] == call["trace_id"] and run["parent_id"] == call["span_id"]


def test_a_call_its_caller_let_go_of_still_ends_its_span(traced: Client, receiver: Receiver) -> None:
    """A caller that timed out and dropped the future, or cancelled the call: the span ends, marked abandoned."""
    session = traced.session(POOL)
    future = session.submit("ping", sleep_s=2)
    task_id = future.id
    with pytest.raises(CallTimeout):
        future.result(0.05)
    del future  # nobody waits for it any more: the router forgets it
    gc.collect()
    call = wait_until(lambda: next((s for s in receiver.spans if s["attributes"].get("flagship.task_id") == task_id
                                    and s["name"] == "flagship.call ping"), None), what="the let-go call's span")
    assert call["attributes"]["error.type"] == "CallAbandoned" and call["status"] == 2  # STATUS_CODE_ERROR
    session.close()


class _Interpreter:
    """DSPy's ``CodeInterpreter`` protocol in-process (the sandbox's own spans come from the same callbacks)."""

    tools: dict[str, Any] = {}

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    @with_callbacks
    def execute(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        if "raise" in code:
            raise CodeExecutionError("NameError: boom")
        return self.invoke_tool("lookup", {"q": code})

    @with_callbacks
    def invoke_tool(self, tool_name: str, kwargs: dict[str, Any]) -> Any:
        return 42


def test_sandbox_executes_and_their_tool_calls_are_spans_with_failures_marked(
    traced: Client, receiver: Receiver
) -> None:
    assert isinstance(_Interpreter(), dspy.CodeInterpreter)
    with dspy.context(callbacks=[SpanCallbacks()]), tracing.span("test.sandbox") as parent:
        assert parent is not None
        assert _Interpreter().execute("print(1)") == 42
        with pytest.raises(CodeExecutionError):
            _Interpreter().execute("raise")
    trace_id = format(parent.get_span_context().trace_id, "032x")
    spans = wait_until(lambda: (lambda t: t if len(t) == 4 else None)(receiver.trace(trace_id)), what="4 spans")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    executes, tool = by_name["sandbox.execute"], by_name["sandbox.tool lookup"][0]
    assert len(executes) == 2 and tool["parent_id"] == executes[0]["span_id"]
    failed = next(s for s in executes if s["attributes"].get("error.type"))
    assert failed["attributes"]["error.type"] == "CodeExecutionError" and failed["status"] == 2  # STATUS_CODE_ERROR


def test_a_call_rerun_after_its_worker_died_stays_in_the_callers_trace(
    traced: Client, receiver: Receiver, workers: list[WorkerProcess]
) -> None:
    """Last here: it kills one of the traced workers. The rerun is sent from a background thread."""
    session = traced.session(POOL, rehydrate=True)
    session.predict("question -> answer")  # a ref the rebuild replays
    node = session.worker
    assert node is not None
    with tracing.span("test.rehydrate") as parent:
        assert parent is not None
        running = session.submit("ping", sleep_s=4)
    wait_until(lambda: traced.registry.liveness([node])[node].in_flight >= 1, what="the call running")
    next(w for w in workers if w.node == node).kill()
    assert running.result(30)["node"] != node
    trace_id = format(parent.get_span_context().trace_id, "032x")
    spans = wait_until(lambda: (lambda t: t if sum(s["name"] == "flagship.call ping" for s in t) == 2 else None)(
        receiver.trace(trace_id)), what="both call spans of the ping")
    root = next(s for s in spans if s["name"] == "test.rehydrate")
    first, rerun = sorted((s for s in spans if s["name"] == "flagship.call ping"),
                          key=lambda s: "error.type" not in s["attributes"])
    assert first["attributes"]["error.type"] == "SessionWorkerUnavailable"
    assert first["parent_id"] == rerun["parent_id"] == root["span_id"]
    assert rerun["attributes"]["flagship.worker"] not in ("", node)
    rebuilt = wait_until(lambda: [s for s in receiver.trace(trace_id) if s["name"] == "flagship.run predict"],
                         what="the rebuilt ref's run")
    assert rebuilt[0]["attributes"]["flagship.rehydration"] is True
