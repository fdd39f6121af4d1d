"""`flagship bench routing`: session routing vs plain Celery, same server, same workers, same run."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

from routing import Client, Pool, PoolTable, Settings, names
from tasks.local.stack import Stack

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


def _throughput(submit: Any, wait: Any, calls: int) -> float:
    t = time.perf_counter()
    pending = [submit(i) for i in range(calls)]
    for item in pending:
        wait(item)
    return calls / (time.perf_counter() - t)


def run(calls: int, block: int, sessions_n: int, per_session: int, rounds: int = 3) -> dict[str, Any]:
    base = Settings.from_env()
    table = PoolTable.load(base.pools_config).with_pool(BENCH_POOL)
    settings = replace(base, pools_config=table.to_json())
    with Stack(settings, env={"FLAGSHIP_POOLS": table.to_json()}, loglevel="warning") as stack:
        stack.start_pools(pools=[BENCH_POOL.name])
        client = Client(stack.redis_url, settings)
        try:
            session = client.session(BENCH_POOL.name)
            queue = names.pool_queue(BENCH_POOL.name)

            direct = names.worker_queue(session.worker or "")

            def plain() -> Any:
                return client.app.send_task(names.NOOP_TASK, queue=queue).get(timeout=10)

            def plain_direct() -> Any:  # same queue topology as the session: isolates the router's cost
                return client.app.send_task(names.NOOP_TASK, queue=direct).get(timeout=10)

            def routed() -> Any:
                return session.call("ping", timeout_s=10)

            _latency(plain, 200), _latency(plain_direct, 200), _latency(routed, 200)  # warm-up
            plain_ms: list[float] = []
            direct_ms: list[float] = []
            routed_ms: list[float] = []
            for _ in range(max(1, calls // block)):  # interleaved, so drift hits all alike
                plain_ms += _latency(plain, block)
                direct_ms += _latency(plain_direct, block)
                routed_ms += _latency(routed, block)

            many = [client.session(BENCH_POOL.name) for _ in range(sessions_n)]
            total = sessions_n * per_session
            plain_rounds, routed_rounds = [], []
            for _ in range(rounds):  # alternating rounds; the median of each side is reported
                plain_rounds.append(_throughput(lambda i: client.app.send_task(names.NOOP_TASK, queue=queue),
                                                lambda r: r.get(timeout=60), total))
                routed_rounds.append(_throughput(lambda i: many[i % sessions_n].submit("ping"),
                                                 lambda f: f.result(60), total))
            plain_tput, routed_tput = statistics.median(plain_rounds), statistics.median(routed_rounds)
            workers_used = sorted({s.worker for s in many})
            for s in [session, *many]:
                s.close()
        finally:
            client.close()
    p = {name: {"p50_ms": statistics.median(s), "p99_ms": _percentile(s, 99), "n": len(s)}
         for name, s in (("plain_celery", plain_ms), ("plain_celery_direct_queue", direct_ms),
                         ("strict_session", routed_ms))}
    return {
        "latency": p,
        "p50_ratio": p["strict_session"]["p50_ms"] / p["plain_celery"]["p50_ms"],
        "p99_ratio": p["strict_session"]["p99_ms"] / p["plain_celery"]["p99_ms"],
        "p50_ratio_same_queue": p["strict_session"]["p50_ms"] / p["plain_celery_direct_queue"]["p50_ms"],
        "throughput": {"plain_celery_calls_s": plain_tput, "sessions_calls_s": routed_tput,
                       "sessions": sessions_n, "workers": workers_used, "calls": total},
        "throughput_ratio": routed_tput / plain_tput,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagship bench routing")
    parser.add_argument("--calls", type=int, default=2000, help="round trips per side")
    parser.add_argument("--block", type=int, default=100, help="interleave plain/routed in blocks of this many")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--per-session", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds per side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.calls, args.block, args.sessions, args.per_session, args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    lat, tput = report["latency"], report["throughput"]
    for name in ("plain_celery", "plain_celery_direct_queue", "strict_session"):
        print(f"{name:26s} p50 {lat[name]['p50_ms']:.3f} ms  p99 {lat[name]['p99_ms']:.3f} ms  (n={lat[name]['n']})")
    print(f"strict session vs plain Celery: p50 ratio {report['p50_ratio']:.3f}  p99 ratio {report['p99_ratio']:.3f}"
          f"  (p50 ratio vs plain Celery on the same direct queue: {report['p50_ratio_same_queue']:.3f})")
    print(f"throughput: plain {tput['plain_celery_calls_s']:.0f} calls/s, {tput['sessions']} sessions over "
          f"{len(tput['workers'])} workers {tput['sessions_calls_s']:.0f} calls/s, "
          f"ratio {report['throughput_ratio']:.3f}")
    return 0
