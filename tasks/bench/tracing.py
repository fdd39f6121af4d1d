"""`flagship bench tracing`: what OpenTelemetry costs a no-op call, off (no exporter named) and on.

Off, the goal is at most 2 % of a no-op call's CPU. Measured three ways in one run:

- the off path's own cost per call, timed in this process: the producer's
  ``tracing.call_span`` + ``end_on`` and the worker's ``run_span`` (exactly what a call
  runs when no exporter is named);
- the CPU of a strict-session ``ping`` round trip (producer + worker + server), the
  no-op call the ratio is taken of;
- the producer's CPU per call as shipped vs with its tracing hooks bypassed (replaced by
  a constant), in interleaved blocks (end to end: the difference is within the noise).

On: the same ``ping`` against a worker exporting every span (``always_on``) over OTLP/HTTP to
a local endpoint that discards them, this process exporting too: the price of tracing every call.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from routing import Client, Pool, PoolTable, Settings, tracing
from routing.producer import router as router_module
from tasks.bench.helpers.env import CpuMeter, own_server, server_pid
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.local.stack import Stack
from tasks.tracing.run import run_span

OFF_POOL = Pool("trace_off_bench_pool", size=1, concurrency=2)
ON_POOL = Pool("trace_on_bench_pool", size=1, concurrency=2)
#: What a call's off path may cost, as a share of a no-op call's CPU.
goal_share = 0.02


def off_path_us(n: int) -> dict[str, float]:
    """Microseconds per call of the producer's and the worker's tracing code with no exporter named."""
    assert tracing.tracer() is None, "a tracer provider is installed: unset OTEL_* to measure the off path"
    reply: Future[Any] = Future()
    request = SimpleNamespace(id="task", delivery_info={})
    route = {"sent_at": time.time(), "pool": OFF_POOL.name}
    started = time.process_time()
    for _ in range(n):
        tracing.call_span("ping", "task", "session", OFF_POOL.name, "strict_queue", "node").end_on(reply)
    producer = (time.process_time() - started) / n * 1e6
    started = time.process_time()
    for _ in range(n):
        with run_span(request, "node", "session", "ping", {}, route):
            pass
    worker = (time.process_time() - started) / n * 1e6
    return {"producer_us": producer, "worker_us": worker, "total_us": producer + worker}


@contextmanager
def bypassed() -> Iterator[None]:
    """The router's tracing hooks replaced by a constant (what the producer did before tracing existed)."""
    shipped = router_module.tracing
    router_module.tracing = SimpleNamespace(call_span=lambda *args: tracing.OFF)  # type: ignore[assignment]
    try:
        yield
    finally:
        router_module.tracing = shipped


@contextmanager
def discarding_endpoint(received: list[int]) -> Iterator[str]:
    """A local OTLP/HTTP endpoint that reads and drops what it is sent (the bytes of each export in ``received``)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append(len(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _block(meter: CpuMeter, cpu: dict[str, float], fn: Callable[[], Any], n: int) -> None:
    meter.start()
    for _ in range(n):
        fn()
    for group, seconds in meter.stop().items():
        cpu[group] = cpu.get(group, 0.0) + seconds


def _per_call(cpu: dict[str, float], calls: int) -> dict[str, float]:
    found = {group: seconds * 1e6 / calls for group, seconds in cpu.items()}
    found["total"] = sum(found.values())
    return found


def run(calls: int, block: int, micro: int) -> dict[str, Any]:
    exports: list[int] = []
    with own_server(Settings.from_env()) as base:
        table = PoolTable.load(base.pools_config).with_pool(OFF_POOL).with_pool(ON_POOL)
        settings = replace(base, pools_config=table.to_json())
        with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack, \
                discarding_endpoint(exports) as endpoint:
            otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            off_worker = stack.start_worker(OFF_POOL.name, wait=False)
            on_worker = stack.start_worker(ON_POOL.name, wait=False, env=otel)
            stack.wait_ready([off_worker, on_worker])
            redis = server_pid(stack.settings)
            micro_us = off_path_us(micro)
            client = Client(stack.redis_url, settings)
            try:
                session = client.session(OFF_POOL.name)

                def ping() -> Any:
                    return session.call("ping", timeout_s=10)

                meter = CpuMeter({"producer": [os.getpid()], "worker": [off_worker.pid], "redis": [redis]})
                cpu: dict[str, dict[str, float]] = {"shipped": {}, "bypassed": {}}
                for _ in range(200):
                    ping()  # warm-up
                rounds = max(1, calls // block)
                for _ in range(rounds):  # interleaved, so drift hits both alike
                    _block(meter, cpu["shipped"], ping, block)
                    with bypassed():
                        _block(meter, cpu["bypassed"], ping, block)
                on = _traced_side(stack, client, otel, on_worker.pid, redis, rounds * block)
            finally:
                client.close()
    shipped, bypass = _per_call(cpu["shipped"], rounds * block), _per_call(cpu["bypassed"], rounds * block)
    return {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "calls_per_side": rounds * block,
            "off_path_us": micro_us, "noop_call_cpu_us": shipped, "noop_call_cpu_us_bypassed": bypass,
            "off_share": micro_us["total_us"] / shipped["total"], "traced_call_cpu_us": on,
            "exports": {"requests": len(exports), "bytes": sum(exports)}}


def _traced_side(stack: Stack, client: Client, otel: dict[str, str], worker_pid: int | None, redis: int | None,
                 calls: int) -> dict[str, float]:
    """The same no-op call with every span exported, by this process and the worker (last: tracing stops after)."""
    saved = {key: os.environ.get(key) for key in otel}
    os.environ.update(otel)
    try:
        tracing.setup("flagship-bench")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    session = client.session(ON_POOL.name)
    meter = CpuMeter({"producer": [os.getpid()], "worker": [worker_pid], "redis": [redis]})
    cpu: dict[str, float] = {}
    for _ in range(200):
        session.call("ping", timeout_s=10)
    _block(meter, cpu, lambda: session.call("ping", timeout_s=10), calls)
    tracing.shutdown()  # off again for what runs next in this process (`flagship bench all`)
    return _per_call(cpu, calls)


def markdown(report: dict[str, Any]) -> str:
    micro, shipped, bypass, on = (report["off_path_us"], report["noop_call_cpu_us"],
                                  report["noop_call_cpu_us_bypassed"], report["traced_call_cpu_us"])
    share = report["off_share"]
    rows = [["tracing off: the off path alone (timed in-process)", f"{micro['producer_us']:.2f}",
             f"{micro['worker_us']:.2f}", "-", f"{micro['total_us']:.2f}"]]
    for label, side in (("no-op `ping`, tracing off (as shipped)", shipped),
                        ("no-op `ping`, producer's tracing hooks bypassed", bypass),
                        ("no-op `ping`, tracing on (every span exported)", on)):
        rows.append([label, f"{side['producer']:.1f}", f"{side['worker']:.1f}", f"{side['redis']:.1f}",
                     f"{side['total']:.1f}"])
    verdict = "met" if share <= goal_share else "NOT met"
    return (f"{report['calls_per_side']} strict-session `ping` round trips per side, {report['when']} "
            f"(2 shared cores; `flagship bench tracing`). CPU µs per call:\n\n"
            + markdown_table(["", "producer", "worker", "server", "total"], rows)
            + f"\n\nTracing off costs {micro['total_us']:.2f} µs of CPU per call, {100 * share:.2f} % of a no-op "
            f"call's {shipped['total']:.0f} µs (goal ≤ {100 * goal_share:.0f} %: {verdict}). The end-to-end "
            f"producer difference, shipped vs bypassed, is {shipped['producer'] - bypass['producer']:+.1f} µs: "
            f"within the run's noise. Tracing on adds {on['total'] - shipped['total']:.0f} µs per call "
            f"(spans built, encoded and sent by both processes: {report['exports']['requests']} exports, "
            f"{report['exports']['bytes'] / 1e6:.1f} MB received).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench tracing")
    parser.add_argument("--calls", type=int, default=2000, help="round trips per side")
    parser.add_argument("--block", type=int, default=100, help="interleave shipped/bypassed in blocks of this many")
    parser.add_argument("--micro", type=int, default=200_000, help="iterations of the off path timed in-process")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help="replace the `tracing` section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args.calls, args.block, args.micro)
    if args.write_docs:
        update_section("tracing", markdown(report))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0 if report["off_share"] <= goal_share else 1
