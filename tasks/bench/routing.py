"""`flagship bench routing`: session routing vs plain Celery, same server, same run.

The baseline is stock Celery (``tasks.bench.helpers.plain_celery``: its own two workers,
``-P threads -c 2``) with the same durability and event settings: acks late and
rejected on worker loss, prefetch 1, task events on, the Redis result backend.
Two more sides isolate the router: plain Celery tasks sent on flagship's own app
(``routing.broker.celery_config``: its transport and worker changes) to its workers'
shared queue and to the session's direct queue. Latency is measured in
interleaved blocks; the CPU-seconds that the producer (this process), the side's
workers and the Redis server spend during each side's blocks, divided by its
calls, is its CPU per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from routing import Client, Pool, PoolTable, Settings, names
from tasks.bench.helpers import plain_celery
from tasks.bench.helpers.env import CpuMeter, own_server, server_pid
from tasks.bench.helpers.report import markdown_table, update_section
from tasks.local.stack import Stack

SIDES = ("stock_celery", "plain_celery", "plain_celery_direct_queue", "strict_session")
STOCK_QUEUE = "stock_bench"

BENCH_POOL = Pool("bench_pool", size=2, concurrency=2)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _latency(fn: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def _metered(meter: CpuMeter, cpu: dict[str, float], fn: Any, n: int) -> list[float]:
    """``_latency(fn, n)``, adding the CPU-seconds each process group spent meanwhile to ``cpu``."""
    meter.start()
    samples = _latency(fn, n)
    for group, seconds in meter.stop().items():
        cpu[group] = cpu.get(group, 0.0) + seconds
    return samples


def _throughput(submit: Any, wait: Any, calls: int) -> float:
    t = time.perf_counter()
    pending = [submit(i) for i in range(calls)]
    for item in pending:
        wait(item)
    return calls / (time.perf_counter() - t)


def run(calls: int, block: int, sessions_n: int, per_session: int, rounds: int = 3) -> dict[str, Any]:
    with own_server(Settings.from_env()) as base:
        return _run(base, calls, block, sessions_n, per_session, rounds)


def start_stock_workers(stack: Stack, n: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
    """``n`` stock Celery workers on ``STOCK_QUEUE``, answering a no-op each before this returns."""
    procs = [subprocess.Popen(plain_celery.worker_command(sys.executable, STOCK_QUEUE, f"stock-{i + 1}@bench",
                                                          concurrency),
                              env=stack.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL) for i in range(n)]
    app = plain_celery.make_app(stack.redis_url)
    try:
        deadline = time.monotonic() + 60
        while len(app.control.ping([f"stock-{i + 1}@bench" for i in range(n)], timeout=0.5)) < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the stock Celery workers did not start")
    except BaseException:
        stop_processes(procs)
        raise
    finally:
        app.close()
    return procs


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(base: Settings, calls: int, block: int, sessions_n: int, per_session: int, rounds: int) -> dict[str, Any]:
    table = PoolTable.load(base.pools_config).with_pool(BENCH_POOL)
    settings = replace(base, pools_config=table.to_json())
    with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack:
        workers = stack.start_pools(pools=[BENCH_POOL.name])
        stock_workers = start_stock_workers(stack, BENCH_POOL.size, BENCH_POOL.concurrency)
        redis_pid = server_pid(stack.settings)
        meter = CpuMeter({"producer": [os.getpid()], "workers": [w.pid for w in workers], "redis": [redis_pid]})
        stock_meter = CpuMeter({"producer": [os.getpid()], "workers": [p.pid for p in stock_workers],
                                "redis": [redis_pid]})
        stock = plain_celery.make_app(stack.redis_url, settings.visibility_timeout_s)
        client = Client(stack.redis_url, settings)
        try:
            session = client.session(BENCH_POOL.name)
            queue = names.pool_queue(BENCH_POOL.name)

            direct = names.worker_queue(session.worker or "")

            def stock_celery() -> Any:
                return stock.send_task(plain_celery.NOOP_TASK, queue=STOCK_QUEUE).get(timeout=10)

            def plain() -> Any:
                return client.app.send_task(names.NOOP_TASK, queue=queue).get(timeout=10)

            def plain_direct() -> Any:  # same queue topology as the session: isolates the router's cost
                return client.app.send_task(names.NOOP_TASK, queue=direct).get(timeout=10)

            def routed() -> Any:
                return session.call("ping", timeout_s=10)

            sides = {"stock_celery": (stock_celery, stock_meter), "plain_celery": (plain, meter),
                     "plain_celery_direct_queue": (plain_direct, meter), "strict_session": (routed, meter)}
            for fn, _ in sides.values():
                _latency(fn, 200)  # warm-up
            samples: dict[str, list[float]] = {side: [] for side in SIDES}
            cpu: dict[str, dict[str, float]] = {side: {} for side in SIDES}
            for _ in range(max(1, calls // block)):  # interleaved, so drift hits all alike
                for side, (fn, side_meter) in sides.items():
                    samples[side] += _metered(side_meter, cpu[side], fn, block)

            many = [client.session(BENCH_POOL.name) for _ in range(sessions_n)]
            total = sessions_n * per_session
            stock_rounds, plain_rounds, routed_rounds = [], [], []
            for _ in range(rounds):  # alternating rounds; the median of each side is reported
                stock_rounds.append(_throughput(lambda i: stock.send_task(plain_celery.NOOP_TASK, queue=STOCK_QUEUE),
                                                lambda r: r.get(timeout=60), total))
                plain_rounds.append(_throughput(lambda i: client.app.send_task(names.NOOP_TASK, queue=queue),
                                                lambda r: r.get(timeout=60), total))
                routed_rounds.append(_throughput(lambda i: many[i % sessions_n].submit("ping"),
                                                 lambda f: f.result(60), total))
            stock_tput = statistics.median(stock_rounds)
            plain_tput, routed_tput = statistics.median(plain_rounds), statistics.median(routed_rounds)
            workers_used = sorted({s.worker for s in many})
            for s in [session, *many]:
                s.close()
        finally:
            client.close()
            stock.close()
            stop_processes(stock_workers)
    p = {name: {"p50_ms": statistics.median(s), "p99_ms": _percentile(s, 99), "n": len(s)}
         for name, s in samples.items()}
    per_call = {side: {group: seconds * 1000 / len(samples[side]) for group, seconds in cpu[side].items()}
                for side in SIDES}
    for side in SIDES:
        per_call[side]["total"] = sum(per_call[side].values())
    session, stock_side, own_side = per_call["strict_session"], per_call["stock_celery"], per_call["plain_celery"]
    return {
        "latency": p,
        "cpu_ms_per_call": per_call,
        "cpu_ratio": session["total"] / stock_side["total"],
        "p50_ratio": p["strict_session"]["p50_ms"] / p["stock_celery"]["p50_ms"],
        "p99_ratio": p["strict_session"]["p99_ms"] / p["stock_celery"]["p99_ms"],
        "cpu_ratio_own_transport": session["total"] / own_side["total"],
        "p50_ratio_own_transport": p["strict_session"]["p50_ms"] / p["plain_celery"]["p50_ms"],
        "p50_ratio_same_queue": p["strict_session"]["p50_ms"] / p["plain_celery_direct_queue"]["p50_ms"],
        "throughput": {"stock_celery_calls_s": stock_tput, "plain_celery_calls_s": plain_tput,
                       "sessions_calls_s": routed_tput, "sessions": sessions_n, "workers": workers_used,
                       "calls": total},
        "throughput_ratio": routed_tput / stock_tput,
    }


LABELS = {"stock_celery": "**plain Celery** (stock, shared queue)",
          "plain_celery": "plain Celery task on flagship's app (shared queue)",
          "plain_celery_direct_queue": "plain Celery task on flagship's app (same direct queue)",
          "strict_session": "strict session `ping`"}


def markdown(report: dict[str, Any]) -> str:
    lat, cpu, tput = report["latency"], report["cpu_ms_per_call"], report["throughput"]
    groups = [g for g in cpu["stock_celery"] if g != "total"]
    rows = [[LABELS[side], f"{lat[side]['p50_ms']:.3f}", f"{lat[side]['p99_ms']:.3f}", f"{cpu[side]['total']:.3f}",
             ", ".join(f"{g} {cpu[side][g]:.3f}" for g in groups)] for side in SIDES]
    rows.append(["**strict session / plain Celery**", f"**{report['p50_ratio']:.3f}**", f"{report['p99_ratio']:.3f}",
                 f"**{report['cpu_ratio']:.3f}**", ""])
    rows.append(["strict session / plain Celery task on flagship's app", f"{report['p50_ratio_own_transport']:.3f}",
                 "", f"{report['cpu_ratio_own_transport']:.3f}", ""])
    met = (report["p50_ratio"] <= 1.05, lat["strict_session"]["p99_ms"] < 10, report["cpu_ratio"] <= 1.0)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{lat['strict_session']['n']} round trips per side in interleaved blocks, {when} (2 shared cores):\n\n"
            + markdown_table(["", "p50 (ms)", "p99 (ms)", "CPU ms / call", "CPU ms / call by process"], rows)
            + f"\n\nA strict session call cost {report['cpu_ratio']:.2f}× the CPU and {report['p50_ratio']:.2f}× the "
              "p50 latency of a stock Celery task in this run. "
            + f"p50 ratio vs a plain Celery task on the same direct queue: {report['p50_ratio_same_queue']:.3f}. "
            + "Targets (against plain Celery): p50 ratio ≤ 1.05 " + ("(met)" if met[0] else "(**not met**)")
            + ", p99 < 10 ms " + ("(met)" if met[1] else "(**not met**)") + ", CPU per call ratio ≤ 1.0 "
            + ("(met)" if met[2] else "(**not met**)") + " in this run.\n\n"
            + f"Throughput, {tput['calls']} calls submitted asynchronously by one producer, then awaited (median of "
              "alternating rounds):\n\n"
            + markdown_table(["", "calls/s"], [
                ["plain Celery no-op (stock), shared queue", f"{tput['stock_celery_calls_s']:.0f}"],
                ["plain Celery no-op on flagship's app, shared queue", f"{tput['plain_celery_calls_s']:.0f}"],
                [f"{tput['sessions']} strict sessions over {len(tput['workers'])} workers",
                 f"{tput['sessions_calls_s']:.0f}"],
                ["ratio, sessions / plain Celery", f"{report['throughput_ratio']:.3f}"]]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench routing")
    parser.add_argument("--calls", type=int, default=2000, help="round trips per side")
    parser.add_argument("--block", type=int, default=100, help="interleave plain/routed in blocks of this many")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--per-session", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds per side")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the `routing` section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    report = run(args.calls, args.block, args.sessions, args.per_session, args.rounds)
    if args.write_docs:
        update_section("routing", markdown(report))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
