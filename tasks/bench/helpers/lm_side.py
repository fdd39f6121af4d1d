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

    def __init__(self, delay_s: float) -> None:
        argv = [sys.executable, "-m", "tasks.bench.helpers.fake_lm_server", "--delay-s", str(delay_s)]
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
