"""What the LM benchmarks share: the fake LM server in its own process, the tickets, fan-out and CPU rounds."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tasks.bench.helpers.env import CpuMeter

POOL_NAME = "lm_bench_pool"
SIGNATURE = "ticket -> category"
TICKETS = ("Checkout returns 502 for all customers", "Password reset email never arrives",
           "Invoice PDF shows the wrong VAT rate", "Dashboard is slow since this morning",
           "Mobile app crashes on login", "Please add dark mode")
MODEL = "openai/local-model"
NO_KEY = "sk-no-key-required"


class FakeServer:
    """The fake LM server in a child process (so its CPU and GIL are its own)."""

    def __init__(self, delay_s: float, chunk_delay_s: float = 0.0) -> None:
        argv = [sys.executable, "-m", "tasks.bench.helpers.fake_lm_server", "--delay-s", str(delay_s),
                "--chunk-delay-s", str(chunk_delay_s)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.stop()
            raise RuntimeError("the fake LM server did not start")

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _fan_out(threads: ThreadPoolExecutor, sessions: int, one: Callable[[int], None]) -> float:
    """Run ``one(i)`` for every session, each on its own thread; wall seconds.

    The threads live across rounds, as in a service: Celery builds a result backend per new thread.
    """
    t = time.perf_counter()
    list(threads.map(one, range(sessions)))
    return time.perf_counter() - t


def _round(meter: CpuMeter, run: Callable[[], float], calls: int) -> dict[str, Any]:
    meter.start()
    wall = run()
    cpu = meter.stop()
    return {"wall_s": wall, "cpu_ms_per_call": {k: v * 1000 / calls for k, v in cpu.items()},
            "cpu_ms_per_call_total": sum(cpu.values()) * 1000 / calls}


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rounds, key=lambda r: r["wall_s"])[len(rounds) // 2]


# -- `flagship bench lm --governor`: the fleet cache and the limiter ---------------------------------------------------

#: Workers of the LM benchmarks answer every call from the provider (the in-process side is uncached too).
UNCACHED = {"FLAGSHIP_LM_CACHE": "off"}


def worker_env(pools_json: str, base_url: str, **more: str) -> dict[str, str]:
    """A bench stack's worker environment: the pool table, the fake LM server as every worker's LM, no retries."""
    return {"FLAGSHIP_POOLS": pools_json, "FLAGSHIP_LM_API_BASE": base_url, "FLAGSHIP_LM": MODEL,
            "FLAGSHIP_LM_RETRIES": "0", **more}


def _p50_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def cache_case(client: Any, pool: str, base_url: str, n: int) -> dict[str, Any]:
    """A cache hit's round trip (DSPy's memory tier on the worker; the fleet tier in Redis) vs a ``ping``."""
    session = client.session(pool)
    try:
        module = session.predict(SIGNATURE, lm=session.lm(MODEL, api_base=base_url))
        for ticket in TICKETS:
            module(ticket=ticket)  # misses: each answer stored once
        k = iter(range(10**9))
        ping = timed(lambda: session.call("ping"), n)
        memory = timed(lambda: module(ticket=TICKETS[0]), n)  # the worker's memory tier keeps the last answers
        fleet = timed(lambda: module(ticket=TICKETS[next(k) % len(TICKETS)]), n)  # one memory entry: Redis serves
        history = session.history(n=n)
        return {"calls": n, "ping_p50_ms": _p50_ms(ping), "memory_hit_p50_ms": _p50_ms(memory),
                "fleet_hit_p50_ms": _p50_ms(fleet), "hits_in_history": sum(e["cache_hit"] for e in history)}
    finally:
        session.close()


def limiter_cpu_case(redis: Any, n: int) -> dict[str, Any]:
    """The limiter's CPU per request on the caller (admit + settle scripts), limited vs not, and Redis's."""
    from tasks.lm.governance import GovernorSettings, parse_limits
    from tasks.lm.limiter import Limiter

    limits = parse_limits('{"bench/limited": {"rpm": 100000000, "tpm": 1000000000, "concurrency": 1000}}')
    limiter = Limiter(redis, GovernorSettings(limits=limits), timeout_s=60)
    found: dict[str, Any] = {}
    for model in ("bench/unlimited", "bench/limited"):
        for _ in range(50):  # warm: scripts loaded, connections made
            limiter.admit(model, None, None, None, 100)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(n):
            admitted = limiter.admit(model, None, None, None, 100)
            settle = admitted.settle_args(120)
            if settle is not None:
                limiter.settle_script(*settle)
        found[model.split("/")[1]] = {"cpu_ms_per_call": (time.thread_time() - cpu) * 1000 / n,
                                      "wall_ms_per_call": (time.perf_counter() - wall) * 1000 / n}
    return found


def adherence_case(client: Any, pool: str, server: Any, rpm: int, window_s: float, windows: int) -> dict[str, Any]:
    """``windows`` windows' worth of calls and one more, offered by 64 threads at once (far above ``rpm``): requests
    at the provider in each full window from the first, and in the busiest sliding window."""
    sessions = [client.session(pool) for _ in range(2)]
    per_session = rpm * (windows + 1) // 2
    try:
        def run(i: int) -> None:
            module = sessions[i].predict(SIGNATURE, lm=sessions[i].lm("limited-model", api_base=server.base_url))
            module.batch([{"ticket": f"{i}-{k} {TICKETS[k % len(TICKETS)]}"} for k in range(per_session)],
                         num_threads=32, return_exceptions=True, timeout_s=600)

        before = len(server.requests)
        with ThreadPoolExecutor(2) as threads:
            list(threads.map(run, range(2)))
        arrivals = sorted(r.at for r in server.requests[before:])
    finally:
        for s in sessions:
            s.close()
    start = arrivals[0]
    full = [sum(1 for a in arrivals if start + w * window_s <= a < start + (w + 1) * window_s)
            for w in range(windows)]
    busiest = max(sum(1 for b in arrivals if a <= b < a + window_s) for a in arrivals)
    return {"rpm": rpm, "window_s": window_s, "offered": 2 * per_session, "sent": len(arrivals),
            "per_window": full, "busiest_sliding_window": busiest,
            "used_share": sum(full) / (rpm * windows)}
